from setuptools import find_packages, setup

setup(
    name="aibackend",
    version="0.1.0",
    description="One Twisted daemon in front of every AI model: HTTP model servers and supervised programs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/aibackend_plugin.py"]},
    install_requires=[
        # 25.5: Site(parsePOSTFormSubmission=...), which the daemon's site passes (24.7 to
        # 24.11 do not start it), after 24.7's HTTP request smuggling fixes. Below 27: the
        # releases it is tested with, 25.5 and 26.10 (aibackend.server's channel and
        # aibackend.directwrite read fields of Twisted's HTTP channel and TCP connections
        # that are not public API; directwrite turns itself off if they are missing).
        "Twisted>=25.5.0,<27",
        "treq>=23.11.0",
        "klein>=23.12.0",
        "hyperlink>=21.0.0",
        "zope.interface>=6.0",
        "prometheus_client>=0.17",  # the /metrics exposition, not hand-written
        "orjson>=3.9",  # JSON checks on the hot path, several times faster than json
        # The fleet's shared store (--store redis://, aibackend.redisstore): redis-py, Redis's own
        # client, its blocking calls in a bounded thread pool (the module says why not txredisapi).
        "redis>=5.0",
        "httptools>=0.9",  # llhttp 9, Node.js's C HTTP parser: the requests the server reads, the models' answers (its strictness is tested)
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            # make test runs the suite on several workers (-n in pytest.ini): most of its time is
            # waiting on real daemons and model processes, not CPU.
            "pytest-xdist>=3.5",
            # The Open Inference Protocol tests call the daemon with Triton's real client.
            "tritonclient[http]>=2.40",
            # The OpenAI-compatible API's tests (tests/test_openai_daemon.py) call the daemon
            # with the official openai client, sync and async, as a user's code would.
            "openai>=1.40",
            # tests/test_fuzz.py: generated paths, queries, headers and bodies against the
            # real daemon, shrunk to the smallest input that earns a 5xx or a traceback.
            "hypothesis>=6.100",
        ],
        "bench": [
            "aiohttp>=3.9",  # the benchmark's Python peer (bench/aiohttp_proxy.py)
            "py-spy>=0.3",  # profiles of the daemon under load (bench/README.md, "Profiling")
            # The OpenAI cases' peer: LiteLLM's proxy (bench/README.md, "The OpenAI section").
            "litellm[proxy]>=1.50",
        ],
        "examples": [
            "scikit-learn>=1.3",  # the iris example model
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
