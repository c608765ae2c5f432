"""bench/train_step.py: its variants and --set overrides build the configs they name."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import train_step  # noqa: E402

IN256 = os.path.join(ROOT, "configs", "in256.py")


def test_the_recompute_attention_variant_turns_save_attention_off():
    assert train_step.variant_config(IN256, "recompute_attention", 2, []).model.save_attention is False
    assert train_step.variant_config(IN256, "default", 2, []).model.save_attention is True


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("0", False), ("true", True), ("1", True)])
def test_bool_overrides_are_read_by_name(text, expected):
    c = train_step.variant_config(IN256, "default", 2, [f"model.save_attention={text}", "model.remat=block"])
    assert c.model.save_attention is expected and c.model.remat == "block"


def test_a_bool_override_that_is_not_a_bool_is_an_error():
    with pytest.raises(ValueError, match="true/false"):
        train_step.variant_config(IN256, "default", 2, ["model.save_attention=maybe"])
