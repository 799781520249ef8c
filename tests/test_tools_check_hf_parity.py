"""The parity checker users run on converted checkpoints."""

import pytest

from segresearch_jax.models import config as config_lib
from segresearch_jax.tools import check_hf_parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen2_5"])
def hf_dir(request, tmp_path_factory):
  cfg = config_lib.get_preset(request.param)
  hf_cfg = dict(config_lib.to_hf_config(cfg))
  model_cls = getattr(transformers, hf_cfg.pop("architectures")[0])
  hf_cfg.pop("model_type")
  model = model_cls(model_cls.config_class(**hf_cfg))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  return path


def test_passes_on_a_transformers_checkpoint(hf_dir, capsys):
  assert check_hf_parity.main(["--hf_dir", str(hf_dir)]) == 0
  assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_passes_with_scanned_layers(hf_dir, capsys, remat):
  # Stacked decoder layers (and DeepStack injected inside the scan) give the same logits.
  assert check_hf_parity.main(["--hf_dir", str(hf_dir), "--scan_layers", "--remat", remat]) == 0
  assert "OK" in capsys.readouterr().out


def test_fails_above_tolerance(hf_dir, capsys):
  assert check_hf_parity.main(["--hf_dir", str(hf_dir), "--tolerance", "0"]) == 1
  assert "FAIL" in capsys.readouterr().out
