"""Shared fixtures: the generated tiny VLM pairs (written once per session, cached by generator hash)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `convert` is a tool folder next to the package

from convert.fixtures import FAMILIES, Fixture, make_fixture  # noqa: E402

DEMO_IMAGE = ROOT / "avis_llamacpp" / "data" / "shapes.png"


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-fixtures")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def vlm_fixture(family: str, fixture_root: Path) -> Fixture:
    return make_fixture(family, "tiny", out_dir=fixture_root)


@pytest.fixture(scope="session")
def llava_fixture(fixture_root: Path) -> Fixture:
    return make_fixture("llava", "tiny", out_dir=fixture_root)


@pytest.fixture(scope="session")
def qwen_fixture(fixture_root: Path) -> Fixture:
    return make_fixture("qwen25vl", "tiny", out_dir=fixture_root)


@pytest.fixture(scope="session")
def demo_image() -> Path:
    return DEMO_IMAGE
