"""
A real machine-learning model: a scikit-learn classifier trained at load on the iris
data set that scikit-learn ships (no download). Served with aibackend.worker.

Input:  {"features": [5.1, 3.5, 1.4, 0.2]}  or  {"instances": [[...], [...]]}
        (sepal length, sepal width, petal length, petal width, in cm)
Output: {"predictions": [{"class": "setosa", "probabilities": {"setosa": 0.98, ...}}],
         "label": ["setosa"], "scores": [[0.98, 0.02, 0.0]]}

"label" and "scores" are the same answer as tensors: through the Open Inference Protocol
(see [models.v2] in etc/aibackend.toml) they are the outputs a Triton client reads.

With [models.batching] (etc/aibackend.toml), requests that arrive together reach
predict_batch: their rows go to scikit-learn in one call (README "Batching").
"""
import numpy

from aibackend.worker import BadInput, log, serve, tensor

USAGE = 'send {"features": [4 numbers]} or {"instances": [[4 numbers], ...]}'


class IrisClassifier:
    def load(self):
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        data = load_iris()
        self.classes = [str(name) for name in data.target_names]
        self.model = LogisticRegression(max_iter=1000).fit(data.data, data.target)
        log(f"trained on {len(data.data)} samples, training accuracy {self.model.score(data.data, data.target):.3f}")

    def rows(self, data):
        """A request's instances as an array of shape (n, 4), or BadInput."""
        if not isinstance(data, dict) or not ("features" in data or "instances" in data):
            raise BadInput(USAGE)
        if "instances" in data:
            rows = tensor(data, "instances", "FP64")
        else:
            rows = tensor(data, "features", "FP64").reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] != 4 or rows.shape[0] == 0:
            raise BadInput(f"{USAGE}; got shape {list(rows.shape)}")
        if not numpy.isfinite(rows).all():
            raise BadInput("each instance is 4 finite numbers (sepal length, sepal width, petal length, petal width)")
        return rows

    def answer(self, probabilities):
        labels = [self.classes[int(p.argmax())] for p in probabilities]
        return {
            "predictions": [
                {"class": label, "probabilities": dict(zip(self.classes, p.tolist()))}
                for label, p in zip(labels, probabilities)
            ],
            "label": labels,
            "scores": probabilities,
        }

    def predict(self, data):
        return self.answer(self.model.predict_proba(self.rows(data)).round(4))

    def predict_batch(self, inputs):
        """
        A batch of requests ([models.batching]): every request's rows in one predict_proba
        call, split back; a request whose input is bad gets its BadInput, the others their
        answers.
        """
        rows, outputs = [], []
        for data in inputs:
            try:
                rows.append(self.rows(data))
                outputs.append(None)
            except BadInput as e:
                rows.append(None)
                outputs.append(e)
        given = [r for r in rows if r is not None]
        if given:
            probabilities = self.model.predict_proba(numpy.concatenate(given)).round(4)
            start = 0
            for index, r in enumerate(rows):
                if r is not None:
                    outputs[index] = self.answer(probabilities[start:start + len(r)])
                    start += len(r)
        return outputs


if __name__ == "__main__":
    serve(IrisClassifier())
