"""make demo's bookkeeping (the demo itself runs ~8 minutes: see README for its measured result)."""
import yaml

from mutex_attn.demo import PRESETS, _same_run


def test_an_interrupted_demo_run_continues_only_under_the_same_settings(tmp_path, capsys):
    settings = dict(data=str(tmp_path / "synth"), model="manet_resnet50", seed=0, device="auto",
                    output=str(tmp_path / "run"), **PRESETS["cpu"]["train"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**settings, "device": "cpu", "workers": 3}))
    assert _same_run(tmp_path, settings)  # device and workers may differ
    older = {**settings, "optimizer": "sgd", "lr": 0.01}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert not _same_run(tmp_path, settings)
    assert "other settings (lr, optimizer): starting again" in capsys.readouterr().out
    (tmp_path / "config.yaml").unlink()
    assert not _same_run(tmp_path, settings)
