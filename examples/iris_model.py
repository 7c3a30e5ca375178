"""
A real machine-learning model: a scikit-learn classifier trained at load on the iris
data set that scikit-learn ships (no download). Served with aibackend.worker.

Input:  {"features": [5.1, 3.5, 1.4, 0.2]}  or  {"instances": [[...], [...]]}
        (sepal length, sepal width, petal length, petal width, in cm)
Output: {"predictions": [{"class": "setosa", "probabilities": {"setosa": 0.98, ...}}]}
"""
import math

from aibackend.worker import BadInput, log, serve


class IrisClassifier:
    def load(self):
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        data = load_iris()
        self.classes = [str(name) for name in data.target_names]
        self.model = LogisticRegression(max_iter=1000).fit(data.data, data.target)
        log(f"trained on {len(data.data)} samples, training accuracy {self.model.score(data.data, data.target):.3f}")

    def predict(self, data):
        if not isinstance(data, dict):
            raise BadInput('send {"features": [4 numbers]} or {"instances": [[4 numbers], ...]}')
        rows = data.get("instances", [data["features"]] if "features" in data else None)
        if not isinstance(rows, list) or not rows:
            raise BadInput('send {"features": [4 numbers]} or {"instances": [[4 numbers], ...]}')
        for row in rows:
            if (
                not isinstance(row, list)
                or len(row) != 4
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row)
            ):
                raise BadInput(f"each instance is 4 finite numbers (sepal length, sepal width, petal length, petal width), got {row!r}")
        probabilities = self.model.predict_proba(rows)
        return {
            "predictions": [
                {
                    "class": self.classes[int(p.argmax())],
                    "probabilities": {name: round(float(v), 4) for name, v in zip(self.classes, p)},
                }
                for p in probabilities
            ]
        }


if __name__ == "__main__":
    serve(IrisClassifier())
