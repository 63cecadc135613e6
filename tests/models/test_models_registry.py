"""Model registry: every registered network is DP-trainable and round-trips."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from privmed.data import make_synthetic
from privmed.errors import ConfigError, DataError
from privmed.models import (
    create_model,
    list_models,
    load_model,
    load_user_model,
    model_kwargs,
    save_model,
)
from privmed.privacy import PrivacyConfig
from privmed.training import TrainConfig, fit


@pytest.mark.parametrize("name", [m.name for m in list_models()])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_registered_models_are_dp_compatible_and_round_trip(name, shape, tmp_path):
    kwargs = model_kwargs(name, shape)
    model = create_model(name, shape[0], 3, **kwargs)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(4, *shape)
    out = model.eval()(x)
    assert out.shape == (4, 3)
    path = save_model(tmp_path / "m.pt", model, name=name, kwargs=kwargs,
                      class_names=("a", "b", "c"), image_shape=shape)
    loaded, info = load_model(path)
    assert info["class_names"] == ["a", "b", "c"]
    assert torch.allclose(loaded(x), out, atol=1e-5)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="no-such"):
        create_model("no-such", 1, 2)


def test_scatter_model_trains_only_its_head_under_dp():
    bundle = make_synthetic(n_train=200, n_val=60, n_test=20, seed=5)
    model = create_model("scatter-linear", 1, 2, **model_kwargs("scatter-linear", (1, 28, 28)))
    fixed_before = {k: v.clone() for k, v in model.fixed_features.state_dict().items()}
    head_before = [p.detach().clone() for p in model.head.parameters()]
    result = fit(model, bundle.train, bundle.val, TrainConfig(epochs=2, batch_size=50),
                 PrivacyConfig(target_epsilon=4.0, delta=1e-3))
    trained = result.model
    for k, v in trained.fixed_features.state_dict().items():
        assert torch.equal(v, fixed_before[k])
    assert any(not torch.equal(a, b) for a, b in
               zip(trained.head.parameters(), head_before, strict=True))
    assert result.metrics["val"]["n"] == 60
    assert result.privacy["epsilon"] <= 4.0


def test_not_a_model_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(DataError, match="not a torch nn.Module"):
        load_user_model(path)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
