"""
A real machine-learning model: a scikit-learn classifier trained at load on the iris
data set that scikit-learn ships (no download). Served with aibackend.worker.

Input:  {"features": [5.1, 3.5, 1.4, 0.2]}  or  {"instances": [[...], [...]]}
        (sepal length, sepal width, petal length, petal width, in cm)
Output: {"predictions": [{"class": "setosa", "probabilities": {"setosa": 0.98, ...}}],
         "label": ["setosa"], "scores": [[0.98, 0.02, 0.0]]}

"label" and "scores" are the same answer as tensors: through the Open Inference Protocol
(see [models.v2] in etc/aibackend.toml) they are the outputs a Triton client reads.
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

    def predict(self, data):
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
        probabilities = self.model.predict_proba(rows).round(4)
        labels = [self.classes[int(p.argmax())] for p in probabilities]
        return {
            "predictions": [
                {"class": label, "probabilities": dict(zip(self.classes, p.tolist()))}
                for label, p in zip(labels, probabilities)
            ],
            "label": labels,
            "scores": probabilities,
        }


if __name__ == "__main__":
    serve(IrisClassifier())
