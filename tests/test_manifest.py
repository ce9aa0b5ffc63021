"""Every released architecture has exactly the published state-dict layout and size."""

import pytest
import torch

from models import DiT_models, U_DiT, count_gmacs, count_params, create_model


def test_registry_holds_every_released_name(manifest):
    assert set(manifest) <= set(DiT_models)
    assert {"U-DiT-S", "U-DiT-B", "U-DiT-L"} | {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} == set(DiT_models)


@pytest.mark.parametrize("name", list(DiT_models))
def test_state_dict_layout_and_params(manifest, name):
    expected = manifest[name]
    with torch.device("meta"):
        model = create_model(name)
    layout = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert layout == expected["state_dict"]
    assert count_params(model) == expected["params"]
    if isinstance(model, U_DiT):
        model.eval().fold_ffn_()
    assert count_params(model) == expected["params_fused"]
    # Matrix and convolution MACs only; the manifest (like the paper) also counts a
    # few element-wise ops, so agree within 1%.
    assert count_gmacs(model.eval()) == pytest.approx(expected["gmacs_256"], rel=0.01)


def test_udit_gmacs_match_flop_counter_figures():
    # SPEC §1: FlopCounterMode gives 6.02 / 22.18 / 84.91 for the folded S / B / L.
    for name, gmacs in (("U-DiT-S", 6.02), ("U-DiT-B", 22.18), ("U-DiT-L", 84.91)):
        with torch.device("meta"):
            model = create_model(name).eval().fold_ffn_()
        assert count_gmacs(model) == pytest.approx(gmacs, abs=0.006)
