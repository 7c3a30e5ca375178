"""
The extension point: what a model type implements to be reached.

The original project's Go prototype had one interface::

    type Sender interface {
        send(body []byte, qt queryType, options ...any) (Json, error)
    }

L{ISender} is that interface on the reactor: C{send} returns a Deferred of the model's
answer instead of blocking for it. L{IModel} adds what the rest of the daemon needs to
know of a model (its state, its load, its last failure, events for ready and idle), so
that no code has to guess with C{getattr}. Optional capabilities are interfaces of their
own, checked with C{providedBy}: L{IRestartable} (a model with processes to restart),
L{IReplicated} (a model spread over replicas), L{IStreaming} (answers in chunks) and
L{IBatching} (takes many requests in one call). A new model type implements L{IModel}
(and the capabilities it has), and registers its type name with
L{aibackend.config.register}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class RequestContext:
    """
    What a model is told about the request besides its body.

    @ivar request_id: the request's id (the client's C{X-Request-Id}, or one we made).
    @ivar operation: the operation, e.g. C{"predict"}.
    @ivar path: for a model whose server has more than one route (a server that speaks
        the Open Inference Protocol itself): the path segments to send to, under the
        server's base path, instead of the model's URL. Other model types ignore it.
    @ivar method: the HTTP method that goes with C{path}.
    """

    request_id: str
    operation: str = "predict"
    path: tuple | None = None
    method: bytes = b"POST"


@dataclass(frozen=True, slots=True)
class RowsContext(RequestContext):
    """
    The context of a request that a batching model concatenates with others along their
    batch dimension (the Open Inference Protocol's, L{aibackend.v2}); a plain
    L{RequestContext} keeps its fields, and the hot path its cost.

    @ivar batch: its L{aibackend.batching.TensorBatch}: the request is batched only with
        requests of the same key, their rows concatenated.
    """

    batch: object = None


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """
    A model's answer: an HTTP status and a body that is known to be JSON text.

    The body is kept as the bytes the model sent, so that a passed-through answer is
    never decoded and encoded again. C{headers} are the few the client gets too (an
    HTTP model's C{Retry-After} with a 429 or 503).
    """

    status: int
    body: bytes
    headers: dict = field(default_factory=dict)


class ISender(Interface):
    """
    A model the daemon can send requests to.
    """

    model_id = Attribute("The model's id (str).")
    type_name = Attribute("The model type's canonical name, e.g. 'http'.")
    spec = Attribute("The validated, frozen spec the model was built from.")
    model_log = Attribute("The model's own bounded log (an aibackend.logs.ModelLog).")

    def send(body: bytes, context: RequestContext):
        """
        Send a JSON request body to the model.

        @param body: the request's JSON text, as bytes.
        @param context: a L{RequestContext}.
        @return: a Deferred that fires with a L{ModelAnswer}, or fails with an
            L{aibackend.errors.ApiError} (C{BadGateway}, C{GatewayTimeout},
            C{ModelUnavailable}, ...). Cancelling it abandons the request.
        """

    def describe():
        """
        @return: a JSON-able dict describing the model's state, without secrets.
        """


# The states a model is in (L{IModel.state}).
READY = "ready"
STARTING = "starting"
RESTARTING = "restarting"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"
STATES = (READY, STARTING, RESTARTING, STOPPING, STOPPED, FAILED)


class IModel(ISender):
    """
    A model as the daemon sees it: what it is, how it is doing, and how to reach it.
    """

    state = Attribute(
        "One of L{STATES}: C{ready} takes requests; C{starting} and C{restarting} will; "
        "C{failed} gave up for now (its processes crash-looped; it tries again later); "
        "C{stopping} and C{stopped} are on their way out."
    )
    in_flight = Attribute("How many requests the model is working on now (int).")
    queued = Attribute("How many requests wait for a place at the model (int).")
    last_failure = Attribute("Why the model last failed, as one line (str), or None.")
    request_timeout = Attribute(
        "How long one request may take, in seconds (float; 0 if the model sets no bound): "
        "how long a model that is removed may take to finish the requests it has."
    )
    startup_timeout = Attribute(
        "How long the model may take to become C{ready} once started, in seconds (float; 0 "
        "if it is ready at once)."
    )

    def whenReady():
        """
        @return: a Deferred that fires with None once the model is C{ready} (at once if it
            is), or fails with L{aibackend.errors.ModelUnavailable} if it becomes
            C{failed} or C{stopped} first. Cancelling it stops the wait only.
        """

    def whenIdle():
        """
        @return: a Deferred that fires with None once nothing is in flight or queued (at
            once if nothing is). Cancelling it stops the wait only.
        """

    def watch(callback):
        """
        Call C{callback(model)} after each change of L{state}.

        @return: a callable of no arguments that stops the watch.
        """


class IRestartable(Interface):
    """A model with processes the daemon supervises and an operator may restart."""

    restarts = Attribute("How many times its processes were restarted (int).")
    live_processes = Attribute("How many of its processes are alive now (int).")

    def restart():
        """Replace every process, one after another (those in flight finish first)."""


class IReplicated(Interface):
    """A model served by several replicas, some of which may be ejected."""

    ejections = Attribute("How many times a replica was ejected after failures in a row (int).")


class IChunks(Interface):
    """
    Where a streaming model puts its answer's chunks: the relay's end of a stream, which
    writes each one to the client in the reactor turn it is given.
    """

    def chunk(data: bytes) -> None:
        """One chunk of the answer: JSON text (bytes), exactly as the model gave it."""

    def registerProducer(producer, streaming: bool) -> None:
        """
        The model's L{twisted.internet.interfaces.IPushProducer} (C{streaming} is True):
        paused while the client reads slower than the model writes, resumed once it has
        caught up, stopped if the client leaves. A model registers one before its first
        chunk, or never (then nothing slows it).
        """

    def unregisterProducer() -> None:
        """The producer registered is done."""


class IStreaming(Interface):
    """A model that can answer in chunks (a text generator, token by token)."""

    def stream(body: bytes, context: RequestContext, chunks: IChunks):
        """
        Send a request whose answer comes in pieces, each given to C{chunks.chunk} as it
        arrives.

        @return: a Deferred that fires once the stream has ended: with the JSON text
            (bytes) of the model's final output, or None if it ended with no output
            (C{done}); or fails with an L{aibackend.errors.ApiError}, before or after
            chunks (the relay tells the client either way). Cancelling it stops the
            model's work on the request (a jsonl model is sent C{{"op": "cancel"}}).
        """


@dataclass(frozen=True, slots=True)
class BatchItem:
    """
    One request of a batch (L{IBatching.send_batch}).

    @ivar body: the request's JSON text (bytes).
    @ivar context: its L{RequestContext}.
    @ivar deadline: when it must be answered by (the clock's seconds): its arrival plus
        the model's C{timeout} (the time it waited to be batched counts).
    """

    body: bytes
    context: RequestContext
    deadline: float


class IBatching(Interface):
    """
    A model that takes many requests in one call (L{aibackend.batching}: the batcher in
    front of it gathers them; C{[models.batching]}).
    """

    batching = Attribute("Its L{aibackend.configbase.BatchingSpec}.")
    batch_stats = Attribute("Its batches' figures (an L{aibackend.batching.BatchStats}).")

    def admit(waiting: int) -> None:
        """
        May one more request wait to be batched? C{waiting} are waiting in the batcher
        already; they count in the model's queue bound (C{max_queue}).

        @raise aibackend.errors.ApiError: no: the model is not ready (503), or its queue is
            full (503, shed).
        """

    def send_batch(items: list):
        """
        Send a batch of L{BatchItem}s to the model in one call.

        @return: a list of Deferreds, one per item in order, each firing with that
            request's L{ModelAnswer} (its own output or its own error answer) or failing
            with an L{aibackend.errors.ApiError} (a failure of the whole batch fails each
            one). Cancelling one abandons that request alone.
        """
