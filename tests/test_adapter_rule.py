"""One adapter rule (issue 15): evaluation and serving accept the same adapter locations, a local
directory or a storage URI, and refuse the same missing ones with the dotted key."""

from __future__ import annotations

import pytest

from actors.models import ModelLoadError, ModelSpec, check_spec


def adapter(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("form", ["path", "uri"])
def test_serving_accepts_the_adapters_evaluation_accepts(tmp_path, form):
    from serve_app.app import check_models, parse_app_config

    path = adapter(tmp_path)
    location = str(path) if form == "path" else path.as_uri()  # file:///... : a storage URI
    check_spec(ModelSpec(base=str(tmp_path), adapter=location), "model")  # evaluation's check
    check_models(parse_app_config({"model": {"base": str(tmp_path), "adapter": location},
                                   "generator": {"backend": "hf"}}))  # serving's: the same rule


@pytest.mark.parametrize("form", ["path", "uri"])
def test_a_missing_adapter_is_refused_alike_naming_the_key(tmp_path, form):
    from serve_app.app import check_models, parse_app_config

    missing = tmp_path / "nowhere"
    location = str(missing) if form == "path" else missing.as_uri()
    with pytest.raises(ModelLoadError, match=r"^model.adapter: .* is not a LoRA adapter directory") as evaluation:
        check_spec(ModelSpec(base=str(tmp_path), adapter=location), "model")
    with pytest.raises(ModelLoadError) as serving:
        check_models(parse_app_config({"model": {"base": str(tmp_path), "adapter": location},
                                       "generator": {"backend": "hf"}}))
    assert str(serving.value) == str(evaluation.value)
