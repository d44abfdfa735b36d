"""KEY=VALUE parsing shared by `scalerec encode --fit`, the LLM capacity benchmark and the loss-fidelity benchmark."""
import pytest

from scalerec.overrides import parse_key_values


def test_values_are_json_when_they_parse_and_strings_otherwise():
    got = parse_key_values(["lr=0.01", "max_steps=400", "betas=[0.9, 0.9]", "restart_patience=null",
                            "schedule=cosine", "flag=true"])
    assert got == {"lr": 0.01, "max_steps": 400, "betas": [0.9, 0.9], "restart_patience": None,
                   "schedule": "cosine", "flag": True}


@pytest.mark.parametrize("bad", ["lr", "=3"])
def test_item_without_key_or_equals_is_an_error_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"--fit '.*': expected KEY=VALUE"):
        parse_key_values([bad], "--fit")
