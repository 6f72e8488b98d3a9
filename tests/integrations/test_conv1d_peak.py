"""Review: patching GPT-2 transposes each Conv1D weight into a new [out, in] Parameter; the [in, out] original
must be freed as soon as its layer is replaced (patch.py: "Peak extra memory is one layer's weight, never a
second copy of the model"). patch_model's own dicts of candidate modules kept every original Conv1D alive
until it returned, so at the last layer both layouts of every Conv1D weight were held at once."""
import gc
import weakref

import hydra_kernels as hk
from hydra_kernels.integrations import patch as patch_module

from tests.integrations._models import R, make_model


def test_each_original_conv1d_weight_is_freed_once_its_layer_is_replaced(monkeypatch):
    model = make_model("gpt2")
    originals = [weakref.ref(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"]
    alive = []
    real = patch_module._to_hydra

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in originals))
        return real(*args, **kwargs)
    monkeypatch.setattr(patch_module, "_to_hydra", counting)
    hk.patch_model(model, r=R)
    n = len(originals)
    # Converting layer k (0-based): layers 0..k-1 are already freed; k and the ones not reached yet remain.
    assert alive == list(range(n, 0, -1))
