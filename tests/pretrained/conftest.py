"""A tiny random Llama saved as a Hugging Face model directory, shared by the export and import tests."""
import pytest

pytest.importorskip("transformers")

from tests.cli.hf_models import write  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return write("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def llama_params(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return model, {name: p.detach() for name, p in model.named_parameters()}
