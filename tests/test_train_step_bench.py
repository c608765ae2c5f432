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


def test_an_unset_placeholder_takes_the_type_it_was_declared_with():
    c = train_step.variant_config(IN256, "default", 2, ["model.size=custom", "model.hidden_size=32", "model.depth=1",
                                                        "model.num_heads=2", "model.qk_norm=false"])
    assert c.model.hidden_size == 32 and isinstance(c.model.hidden_size, int)
    assert c.model.qk_norm is False


def test_a_bool_override_that_is_not_a_bool_is_an_error():
    with pytest.raises(ValueError, match="true/false"):
        train_step.variant_config(IN256, "default", 2, ["model.save_attention=maybe"])


def test_sampling_bench_times_the_asked_steps_and_reports_the_samplers_memory():
    c = train_step.variant_config(IN256, "default", 2, ["model.size=custom", "model.hidden_size=32", "model.depth=1",
                                                        "model.num_heads=2", "model.layer_loop=scan"])
    out = train_step.bench_sampling(c, batch=4, steps_list=(2,), repeats=1)  # 4 CPU devices
    assert set(out) == {"2step"}
    r = out["2step"]
    assert r["batch"] == 4 and r["repeats"] == 1 and r["ms_per_batch"] > 0
    assert r["compiled_memory_mb"] > 0


@pytest.mark.parametrize("flags,message", [(["--sampling_steps", "1,x"], "comma list of step counts"),
                                           (["--sampling_steps", "0"], "must all be >= 1"),
                                           (["--sampling_repeats", "0"], "must be >= 1")])
def test_bad_sampling_flags_are_refused_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_step.main(["--variants", "", "--sampling", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
