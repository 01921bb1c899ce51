"""The documentation site: it builds in strict mode, its generated pages are current, its alert
rules load in Prometheus, and it names only settings and metrics that exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys


from iwsproxy.metrics import PrometheusMetrics
from iwsproxy.settings import Settings
from iwsproxy.tools import settings_doc
from conftest import needs

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ALERTS = DOCS / "operations" / "iwsproxy-alerts.yml"
ALERT_TESTS = pathlib.Path(__file__).resolve().parent / "alerts_test.yml"


def _texts() -> dict[str, str]:
    pages = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}
    pages["README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")
    pages[str(ALERTS.relative_to(ROOT))] = ALERTS.read_text(encoding="utf-8")
    return pages


def test_the_settings_page_is_generated_from_settings_py():
    assert settings_doc.PAGE.read_text(encoding="utf-8") == settings_doc.generate(), (
        "docs/reference/settings.md is out of date: run python -m iwsproxy.tools.settings_doc --write")


def test_the_settings_page_lists_every_setting_with_its_flag_and_default():
    page = settings_doc.generate()
    for f in dataclasses.fields(Settings):
        assert f"### {f.metadata['env']}\n" in page
        if f.metadata["flag"]:
            assert f"`{f.metadata['flag']}`" in page


def test_the_site_builds_in_strict_mode(tmp_path):
    """Strict mode turns every warning into a failure: a broken link or anchor, a page missing from disk."""
    needs(None if importlib.util.find_spec("mkdocs") else "mkdocs is not installed (pip install -e '.[docs]')",
          "the docs build")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "reference" / "settings" / "index.html").exists()


def _promtool() -> str:
    promtool = shutil.which("promtool")
    needs(None if promtool else "promtool is not installed (apt-get install prometheus)", "promtool")
    return promtool


def test_the_example_alert_rules_are_valid_prometheus_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_alerts_fire_on_the_series_they_describe():
    """promtool's rule unit tests (tests/unit/alerts_test.yml): each alert fires on its symptom."""
    result = subprocess.run([_promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


NOT_METRICS = {"iwsproxy_id"}  # the assigned id's default cookie name


def test_the_docs_name_only_environment_variables_that_exist():
    """Settings' variables, and the others the code reads (IWSPROXY_LOG_LEVEL, ...); IWSPROXY_X is a placeholder."""
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)} | {"IWSPROXY_X"}
    for source in (ROOT / "iwsproxy").rglob("*.py"):
        known |= set(re.findall(r"\bIWSPROXY_[A-Z_]*[A-Z]\b", source.read_text(encoding="utf-8")))
    for name, text in _texts().items():
        unknown = set(re.findall(r"\bIWSPROXY_[A-Z_]*[A-Z]\b", text)) - known
        assert not unknown, f"{name} names {sorted(unknown)}"


def test_the_docs_name_only_metrics_that_exist():
    metrics = PrometheusMetrics()
    known = set()
    for family in metrics.registry.collect():
        for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
            known.add(family.name + suffix)
    for name, text in _texts().items():
        unknown = set(re.findall(r"(?<![#\w/-])iwsproxy_[a-z_]*[a-z]\b", text)) - known - NOT_METRICS
        assert not unknown, f"{name} names {sorted(unknown)}"


def test_the_readme_links_only_to_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", readme)
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_metrics_reference_lists_every_metric():
    page = (DOCS / "reference" / "metrics.md").read_text(encoding="utf-8")
    for family in PrometheusMetrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in page, f"docs/reference/metrics.md does not list {name}"


def test_the_python_examples_in_the_docs_compile():
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            if not block.startswith(">>>"):  # sessions are run by test_readme_tour where they matter
                compile(block, f"{page.relative_to(ROOT)}", "exec")
