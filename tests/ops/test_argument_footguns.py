"""Arguments that look plausible but mean nothing right are refused with a ValueError naming the argument:
a str temperature ("0.7") or a bool one, non-finite or bool scaling, a bool adapter index, in_features /
out_features / rank 0, and hidden size D = 0; check_lora_args refuses one str of adapters, a bool rank, and a
nan / negative / str alpha."""
import numpy as np
import pytest
import torch

from hydra_kernels import ops


def _lora(K=6, N=5, n=2, r=2, rows=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(n, r, K, generator=g),
            torch.randn(n, N, r, generator=g))


def _cases():
    x, w, A, B = _lora()
    logits, ref, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    h, head = torch.randn(2, 3, 8), torch.randn(11, 8)
    x0, w0, A0, B0 = _lora(K=0)
    return [
        ("temperature", lambda: ops.token_logprobs(logits, t, temperature="0.7")),
        ("temperature", lambda: ops.logprobs_and_kl(logits, ref, t, temperature="0.7")),
        ("temperature", lambda: ops.linear_logprobs(h, head, t, temperature="0.7")),
        ("temperature", lambda: ops.token_logprobs(logits, t, temperature=True)),
        ("temperature", lambda: ops.linear_logprobs(h, head, t, temperature=b"1")),
        ("scaling", lambda: ops.lora_linear(x, w, None, A, B, float("nan"), (0, 1), backend="torch")),
        ("scaling", lambda: ops.lora_linear(x, w, None, A, B, float("inf"), (0, 1), backend="torch")),
        ("scaling", lambda: ops.lora_linear(x, w, None, A, B, [0.5, float("-inf")], (0, 1), backend="torch")),
        ("scaling", lambda: ops.lora_linear(x, w, None, A, B, np.float32("nan"), (0, 1), backend="torch")),
        ("scaling", lambda: ops.lora_linear(x, w, None, A, B, True, (0, 1), backend="torch")),
        ("stream_adapters", lambda: ops.lora_linear(x, w, None, A, B, 0.5, (True, 0), backend="torch")),
        ("stream_adapters", lambda: ops.lora_linear(x, w, None, A, B, 0.5, (False,), backend="torch")),
        ("weight", lambda: ops.lora_linear(x0, w0, None, A0, B0, 0.5, (0,), backend="torch")),
        ("weight", lambda: ops.lora_linear(torch.randn(2, 3), torch.randn(0, 3), backend="torch")),
        ("lora_A", lambda: ops.lora_linear(x, w, None, A[:, :0], B[:, :, :0], 0.5, (0,), backend="torch")),
        ("hidden", lambda: ops.linear_logprobs(h[..., :0], head[:, :0], t)),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_footgun_raises_value_error_naming_the_argument(case):
    name, call = _cases()[case]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


def test_numbers_of_other_types_are_still_accepted():
    logits, t = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    want = ops.token_logprobs(logits, t, temperature=0.5)
    for temp in (np.float32(0.5), np.float64(0.5)):
        torch.testing.assert_close(ops.token_logprobs(logits, t, temperature=temp), want, rtol=0, atol=0)
    x, w, A, B = _lora()
    y = ops.lora_linear(x, w, None, A, B, 0.5, (np.int64(0), 1), backend="torch")
    torch.testing.assert_close(ops.lora_linear(x, w, None, A, B, 0.5, (0, 1), backend="torch"), y, rtol=0, atol=0)


@pytest.mark.parametrize("adapters, r, alpha, name", [
    ("actor", 4, 8, "adapters"),
    (["actor", "base"], 4, 8, "adapters"),
    (None, 4, 8, "adapters"),
    (("actor",), True, 8, "r"),
    (("actor",), 4.0, 8, "r"),
    (("actor",), 0, 8, "r"),
    (("actor",), 4, float("nan"), "alpha"),
    (("actor",), 4, -8, "alpha"),
    (("actor",), 4, "8", "alpha"),
    (("actor",), 4, False, "alpha"),
])
def test_check_lora_args(adapters, r, alpha, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ops.check_lora_args(adapters, r, alpha, reserved=("base",))


def test_check_lora_args_returns_canonical_values():
    assert ops.check_lora_args(["a", "b"], np.int64(4), np.float32(8), reserved=("base",)) == (("a", "b"), 4, 8.0)
