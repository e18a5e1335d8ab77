"""The README's test command is exactly what CI runs."""
import re

from _parity import REPO_ROOT


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    ci_command = ci_lines[-1]
    match = re.search(r"The test command is `([^`]+)`", readme)
    assert match, "README must state 'The test command is `...`'"
    assert match.group(1) == ci_command
    assert ci_command in readme.split("```bash")[2]  # the copy-paste set-up line uses it too


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every README Python block, in order, in one namespace: downloads replaced by met3r_diffusers.testing."""
    pytest = __import__("pytest")
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    import met3r_diffusers.metric as metric_module
    from met3r_diffusers.testing import PlaneGeometry, TinyFeatures, tiny_sd_components

    original = metric_module.MEt3R

    class OfflineMEt3R(original):
        """MEt3R with the named (downloaded) networks replaced by the tiny stand-ins."""

        def __init__(self, *args, **kwargs):
            if isinstance(kwargs.get("backbone", "mast3r"), str):
                kwargs["backbone"] = PlaneGeometry()
            if isinstance(kwargs.get("feature_backbone", "dino16"), str):
                kwargs["feature_backbone"] = TinyFeatures()
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(metric_module, "MEt3R", OfflineMEt3R)
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    namespace = {"pipe": pipe, "prompt": "a chair"}
    blocks = _python_blocks((REPO_ROOT / "README.md").read_text())
    assert len(blocks) >= 4
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # name the block that broke
            raise AssertionError(f"README python block {number} failed: {error!r}\n{block}") from error
    assert namespace["out"].score.dtype == __import__("torch").float32
    assert len(namespace["callback"].history) >= 1
    assert float(namespace["loss"]) >= 0
