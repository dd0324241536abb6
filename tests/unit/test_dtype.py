"""WORKER_DTYPE=auto: float32 on CPU; on CUDA bfloat16 where the GPU has it, else float16 unless
the family is known to overflow it."""

import pytest
import torch

from services.worker.model.loader import FP16_OVERFLOW_FAMILIES, pick_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_auto_on_cpu_is_float32(model_type):
    assert pick_dtype("auto", CPU, model_type, torch.bfloat16) is torch.float32


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "gpt2"])
def test_auto_on_a_bf16_gpu_is_bfloat16_for_every_family(model_type):
    assert pick_dtype("auto", CUDA, model_type, torch.float16, bf16_supported=True) is torch.bfloat16


def test_auto_on_an_older_gpu_is_the_models_dtype_never_float16_for_families_that_overflow_it():
    assert pick_dtype("auto", CUDA, "llama", torch.bfloat16, bf16_supported=False) is torch.float16
    assert pick_dtype("auto", CUDA, "llama", torch.float16, bf16_supported=False) is torch.float16
    assert pick_dtype("auto", CUDA, "gpt2", torch.float32, bf16_supported=False) is torch.float32
    assert pick_dtype("auto", CUDA, "gpt2", None, bf16_supported=False) is torch.float16
    for family in FP16_OVERFLOW_FAMILIES:
        assert pick_dtype("auto", CUDA, family, torch.bfloat16, bf16_supported=False) is torch.float32


def test_an_explicit_dtype_is_taken_as_given():
    assert pick_dtype("float16", CUDA, "gemma2", torch.bfloat16, bf16_supported=True) is torch.float16
    assert pick_dtype("bfloat16", CPU) is torch.bfloat16
