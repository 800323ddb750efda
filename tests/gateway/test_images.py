"""The local image store: building, resolving by tag, listing and rejecting bad projects."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmflow.cli.main import app
from vmflow.gateway.errors import ImageError, NotFoundError
from vmflow.gateway.images import ImageStore, split_reference


def write_project(directory: Path, toml: str, files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmflow.toml").write_text(toml)
    for name, text in (files or {"tasks.py": "X = 1\n"}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def test_images_build_and_resolve_by_tag(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    project = write_project(tmp_path / "p", '[image]\nname = "demo"\ntasks = ["tasks"]\n')

    manifest = store.build(project, "team/demo:1.0")
    image = store.resolve("team/demo:1.0@sha256:" + "a" * 64)

    assert manifest.digest.startswith("sha256:")
    assert image.manifest.digest == manifest.digest
    assert image.manifest.reference == "team/demo:1.0"
    assert image.manifest.tasks == ["tasks"]
    assert (image.app_dir / "tasks.py").read_text() == "X = 1\n"


def test_images_rebuild_keeps_old_digest(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    project = write_project(tmp_path / "p", '[image]\ntasks = ["tasks"]\n')
    first = store.build(project, "demo:latest")
    (project / "tasks.py").write_text("X = 2\n")

    second = store.build(project, "demo")
    old = store.resolve_digest(first.digest, "demo:latest")

    assert second.digest != first.digest
    assert store.resolve("demo").manifest.digest == second.digest
    assert (old.app_dir / "tasks.py").read_text() == "X = 1\n"
    assert [m.reference for m in store.list()] == ["demo:latest"]


def test_images_unknown_reference_names_it(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="'nothing:1' not found") as caught:
        ImageStore(tmp_path).resolve("nothing:1")
    assert "vmflow image build DIR --tag nothing:1" in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("", "no \\[image\\] table"),
        ("[image\n", "not valid TOML"),
        ('[image]\ntasks = "tasks"\n', "must be a list of module names"),
        ('[image]\ntasks = ["missing"]\n', "'missing' not found"),
        ('[image]\ntasks = ["tasks"]\ncommand = []\n', "command must be a non-empty list"),
    ],
)
def test_images_reject_bad_project(tmp_path: Path, toml: str, message: str) -> None:
    project = write_project(tmp_path / "p", toml)
    with pytest.raises(ImageError, match=message):
        ImageStore(tmp_path / "store").build(project, "bad:1")
    assert not (tmp_path / "store" / "tags").exists()


def test_images_split_reference_keeps_registry_port() -> None:
    assert split_reference("registry:5000/team/app") == ("registry:5000/team/app", "latest")
    assert split_reference("registry:5000/team/app:2") == ("registry:5000/team/app", "2")


def test_images_cli_build_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFLOW_GATEWAY_IMAGE_DIR", str(tmp_path / "store"))
    project = write_project(tmp_path / "p", '[image]\ntasks = ["tasks"]\n')
    runner = CliRunner()

    built = runner.invoke(app, ["image", "build", str(project), "--tag", "cli:1"])
    listed = runner.invoke(app, ["image", "list"])
    failed = runner.invoke(app, ["image", "build", str(tmp_path), "--tag", "cli:2"])

    assert built.exit_code == 0, built.output
    assert built.output.startswith("cli:1 sha256:")
    assert listed.output.startswith("cli:1\tsha256:")
    assert failed.exit_code == 1
    assert "vmflow.toml not found" in failed.output
