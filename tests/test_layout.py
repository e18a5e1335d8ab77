"""The package's layout rules: no module imports another module's private names; public names stay importable."""
from __future__ import annotations

import ast
import importlib
import warnings

import pytest
from _parity import REPO_ROOT

CHECKED = ["met3r_diffusers", "pipelines", "training", "benchmarks"]


def _own_module(node: ast.ImportFrom) -> str | None:
    """The met3r_diffusers module an import reads from (None for third-party imports)."""
    if node.level:  # relative: inside the package
        return "." * node.level + (node.module or "")
    if node.module and node.module.split(".")[0] == "met3r_diffusers":
        return node.module
    return None


def _private_uses(path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found, own_modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:  # our modules, sibling scripts and third-party packages alike
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
                elif _own_module(node) is not None:
                    own_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "met3r_diffusers":
                    own_modules.add((alias.asname or alias.name).split(".")[0])
    # a subclass may read its base class's private attributes (that is inheritance, not a cross-module use)
    bases = {base.id for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
             for base in node.bases if isinstance(base, ast.Name)}
    for node in ast.walk(tree):  # `name._private` on a name imported from the package
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in own_modules - bases):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = [path for folder in CHECKED for path in sorted((REPO_ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    offences = [use for path in files for use in _private_uses(path)]
    assert offences == []


def test_the_checker_sees_private_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ..data import _hidden\nfrom met3r_diffusers import functional\nfrom bench_dust3r import _rate\n"
        "functional._focal_votes\nclass A(functional.X):\n    pass\n"
    )
    assert len(_private_uses(probe)) == 3


DESIGN_NAMES = {
    "met3r_diffusers": ["MEt3R", "MEt3ROutput", "MEt3RLoss", "MEt3RConfig", "MEt3RMetric", "MEt3REvalHook",
                        "MEt3RCallback", "render_points", "RenderOutput", "predict_x0", "decode_views", "ViewLayout"],
    "met3r_diffusers.render": ["render_points", "RenderOutput"],
    "met3r_diffusers.models": ["DUSt3R", "MASt3R", "DinoFeatUp"],
    "met3r_diffusers.callbacks": ["MEt3RCallback", "SchedulerTap"],
    "met3r_diffusers.functional": ["canonical_point_map", "estimate_focal", "render_pair", "pair_scores",
                                   "score_pairs", "sample_scores", "fold_symmetric"],
    "met3r_diffusers.diffusion": ["ViewLayout", "decode_views", "decode_latents", "predict_x0",
                                  "sample_coefficients", "is_sigma_space", "is_flow_matching"],
    "met3r_diffusers.pairs": ["resolve_pairs", "PairSpec"],
    "met3r_diffusers.loss": ["MEt3RLoss", "guidance_objective", "guidance_direction", "decode_views", "predict_x0"],
    "met3r_diffusers.evaluation": ["MEt3RMetric", "MEt3REvalHook"],
    "met3r_diffusers.testing": ["tiny_met3r", "PlaneGeometry", "TinyFeatures", "FeatureConsistencyMetric",
                                "tiny_sd_components", "tiny_vae", "tiny_unet", "tiny_clip_tokenizer"],
    "met3r_diffusers.geometry": ["geometry_from_cameras", "canonical_point_map", "estimate_focal"],
    "met3r_diffusers.metric": ["MEt3R", "MEt3RConfig", "MEt3ROutput", "geometry_from_cameras"],
}


@pytest.mark.parametrize("module", list(DESIGN_NAMES))
def test_public_names_import(module):
    imported = importlib.import_module(module)
    for name in DESIGN_NAMES[module]:
        assert getattr(imported, name) is not None, f"{module}.{name}"


@pytest.mark.parametrize("old, new", [
    ("met3r_diffusers.views:resolve_pairs", "met3r_diffusers.pairs:resolve_pairs"),
    ("met3r_diffusers.views:ViewLayout", "met3r_diffusers.diffusion:ViewLayout"),
    ("met3r_diffusers.training:MEt3REvalHook", "met3r_diffusers.evaluation:MEt3REvalHook"),
    ("met3r_diffusers.callbacks:guidance_scores", "met3r_diffusers.loss:guidance_objective"),
])
def test_renamed_names_keep_a_deprecated_alias(old, new):
    old_module, old_name = old.split(":")
    new_module, new_name = new.split(":")
    with pytest.warns(FutureWarning):
        alias = getattr(importlib.import_module(old_module), old_name)
    assert alias is getattr(importlib.import_module(new_module), new_name)


def test_deprecated_evaluator_is_the_torchmetrics_metric():
    from met3r_diffusers import MEt3REvaluator, MEt3RMetric
    from met3r_diffusers.testing import FeatureConsistencyMetric

    with pytest.warns(FutureWarning, match="MEt3RMetric"):
        evaluator = MEt3REvaluator(FeatureConsistencyMetric())
    assert isinstance(evaluator, MEt3RMetric)


def test_logging_verbosity_helpers():
    import logging

    from met3r_diffusers import logging as met3r_logging

    with warnings.catch_warnings():
        met3r_logging.set_verbosity_info()
        assert met3r_logging.get_verbosity() == logging.INFO
        assert met3r_logging.get_logger("met3r_diffusers.loss").getEffectiveLevel() == logging.INFO
        met3r_logging.set_verbosity_warning()
        assert met3r_logging.get_verbosity() == logging.WARNING
    with pytest.raises(ValueError, match="level"):
        met3r_logging.set_verbosity("loud")


def test_deprecated_masked_pair_scores_and_num_views_keyword():
    import torch

    from met3r_diffusers.diffusion import decode_views
    from met3r_diffusers.loss import masked_pair_scores

    score_map, mask = torch.rand(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    mask[:, 1] = 0
    with pytest.warns(FutureWarning):
        scores, valid = masked_pair_scores(score_map, mask, 3)
    assert valid[:, 1].logical_not().all() and (scores[:, 1] == 0).all()
    with pytest.warns(FutureWarning, match="num_views"):
        views = decode_views(lambda z: z[:, :3], torch.rand(4, 4, 8, 8), num_views=2)
    assert views.shape == (2, 2, 3, 8, 8)
