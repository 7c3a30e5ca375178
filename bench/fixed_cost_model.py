"""
The batching section's model (bench/run.py, bench/README.md): an aibackend.worker model
whose every call costs a fixed time plus a little per item, as a numpy or scikit-learn
predict does (the fixed part: the call, the conversions, the dispatch; the per-item part:
the rows). It answers each input as it came.

    python bench/fixed_cost_model.py [--batch] [--fixed-ms 2] [--per-item-ms 0.05]

With --batch it has a predict_batch (one call for the batch: fixed + per item x size), so
a model with [models.batching] gets each batch in one call; without, only predict.
"""

import argparse
import time

from aibackend.worker import serve

parser = argparse.ArgumentParser()
parser.add_argument("--batch", action="store_true")
parser.add_argument("--fixed-ms", type=float, default=2.0)
parser.add_argument("--per-item-ms", type=float, default=0.05)
args = parser.parse_args()
FIXED, PER_ITEM = args.fixed_ms / 1000, args.per_item_ms / 1000


def predict(data):
    time.sleep(FIXED + PER_ITEM)
    return data


class Batched:
    def predict(self, data):
        return predict(data)

    def predict_batch(self, inputs):
        time.sleep(FIXED + PER_ITEM * len(inputs))
        return inputs


serve(Batched() if args.batch else predict)
