"""Local image store: task project directories copied in, with a manifest, resolved by tag.

Image contents are immutable: `<image dir>/digests/<hex>/` contains `manifest.json` next to
`app/`, the project's files, and `<image dir>/tags/<quoted name>/<tag>` contains the digest the
tag points at. Rebuilding a tag writes a new digest directory, so running instances and
snapshots keep the files they were started from. See docs/images.md for the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tomllib
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

from vmflow.compute.images import InvalidImageReferenceError, strip_image_digest
from vmflow.gateway.errors import ImageError, NotFoundError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
PROJECT_FILE = "vmflow.toml"
DEFAULT_TAG = "latest"
# Directories that never belong in an image: VCS data, virtualenvs and bytecode caches.
_IGNORED_NAMES = {".git", ".hg", ".venv", "venv", "__pycache__", ".mypy_cache", ".pytest_cache"}


@dataclass(frozen=True)
class ImageManifest:
    name: str
    tag: str
    tasks: list[str]
    digest: str
    created_at: str
    command: list[str] | None = None
    format: int = MANIFEST_FORMAT

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Image:
    """An image in the store: its manifest and the directory mounted at /app."""

    manifest: ImageManifest
    path: Path
    app_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "app_dir", self.path / "app")


def split_reference(reference: str) -> tuple[str, str]:
    """Split `name[:tag][@digest]` into name and tag; the digest is dropped, the tag defaults."""
    try:
        stripped = strip_image_digest(reference)
    except InvalidImageReferenceError as error:
        raise ImageError(str(error)) from None
    name, sep, tag = stripped.rpartition(":")
    # A colon inside the registry host (`host:5000/repo`) is not a tag separator.
    if not sep or "/" in tag:
        return stripped, DEFAULT_TAG
    return name, tag


class ImageStore:
    """Images in one directory; building replaces an existing tag atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _tag_path(self, name: str, tag: str) -> Path:
        return self.root / "tags" / quote(name, safe="") / tag

    def _digest_path(self, digest: str) -> Path:
        return self.root / "digests" / digest.removeprefix("sha256:")

    def resolve(self, reference: str) -> Image:
        """Return the image a reference names, raising `NotFoundError` naming it otherwise."""
        name, tag = split_reference(reference)
        tag_path = self._tag_path(name, tag)
        path = self._digest_path(tag_path.read_text().strip()) if tag_path.is_file() else None
        if path is None or not (path / "manifest.json").is_file():
            raise NotFoundError(
                f"image '{name}:{tag}' not found in the image store {self.root}; "
                f"build it with `vmflow image build DIR --tag {name}:{tag}`"
            )
        # One digest may carry several tags; the manifest names the reference that was resolved.
        manifest = _read_manifest(path / "manifest.json")
        return Image(manifest=replace(manifest, name=name, tag=tag), path=path)

    def resolve_digest(self, digest: str, reference: str) -> Image:
        """Return the image with `digest`, the one a snapshot or template was taken from."""
        path = self._digest_path(digest)
        if not (path / "manifest.json").is_file():
            raise NotFoundError(
                f"image {reference} with digest {digest} is no longer in the image store "
                f"{self.root}; rebuild it from the same project directory"
            )
        name, tag = split_reference(reference)
        return Image(
            manifest=replace(_read_manifest(path / "manifest.json"), name=name, tag=tag), path=path
        )

    def list(self) -> list[ImageManifest]:
        """Return the manifest of every tag in the store, sorted by name and tag."""
        manifests: list[ImageManifest] = []
        tags_dir = self.root / "tags"
        if not tags_dir.is_dir():
            return manifests
        for name_dir in sorted(tags_dir.iterdir()):
            for tag_path in sorted(name_dir.iterdir()):
                manifest_path = self._digest_path(tag_path.read_text().strip()) / "manifest.json"
                if tag_path.is_file() and manifest_path.is_file():
                    manifest = _read_manifest(manifest_path)
                    manifests.append(
                        replace(manifest, name=unquote(name_dir.name), tag=tag_path.name)
                    )
        return manifests

    def build(self, project_dir: Path, tag: str) -> ImageManifest:
        """Copy a task project directory into the store under `tag` (`name[:tag]`)."""
        name, image_tag = split_reference(tag)
        project = load_project(project_dir)
        if project.get("name") and project["name"] != name:
            logger.info(
                "image name %s from --tag overrides name %s in %s",
                name,
                project["name"],
                project_dir / PROJECT_FILE,
            )

        staging = self.root / "digests" / f".build-{uuid.uuid4().hex}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(
                project_dir,
                staging / "app",
                ignore=shutil.ignore_patterns(*_IGNORED_NAMES, "*.pyc"),
                symlinks=True,
            )
            manifest = ImageManifest(
                name=name,
                tag=image_tag,
                tasks=project["tasks"],
                command=project.get("command"),
                digest=content_digest(staging / "app"),
                created_at=datetime.now(UTC).isoformat(),
            )
            (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2) + "\n")
            final = self._digest_path(manifest.digest)
            if not final.exists():
                staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        # The tag file is replaced by rename, so a reader sees the old or the new digest.
        tag_path = self._tag_path(name, image_tag)
        tag_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = tag_path.with_name(f".{image_tag}.{uuid.uuid4().hex}")
        temporary.write_text(manifest.digest + "\n")
        temporary.rename(tag_path)
        logger.info(
            "built image %s digest %s from %s", manifest.reference, manifest.digest, project_dir
        )
        return manifest


def load_project(project_dir: Path) -> dict:
    """Read and check `[image]` of a project's vmflow.toml; raise `ImageError` naming the fault."""
    project_file = project_dir / PROJECT_FILE
    if not project_file.is_file():
        raise ImageError(f"{project_file} not found; a task project needs a {PROJECT_FILE}")
    try:
        document = tomllib.loads(project_file.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ImageError(f"{project_file} is not valid TOML: {error}") from None

    section = document.get("image")
    if not isinstance(section, dict):
        raise ImageError(f"{project_file} has no [image] table; add name and tasks under [image]")
    tasks = section.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ImageError(
            f"{project_file}: [image] tasks must be a list of module names, got {tasks!r}"
        )
    for module in tasks:
        relative = Path(*module.split("."))
        if (
            not (project_dir / relative.with_suffix(".py")).is_file()
            and not (project_dir / relative / "__init__.py").is_file()
        ):
            raise ImageError(
                f"{project_file}: task module {module!r} not found as {relative}.py "
                f"or {relative}/__init__.py under {project_dir}"
            )
    command = section.get("command")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command)
    ):
        raise ImageError(
            f"{project_file}: [image] command must be a non-empty list of strings, got {command!r}"
        )
    name = section.get("name")
    if name is not None and not isinstance(name, str):
        raise ImageError(f"{project_file}: [image] name must be a string, got {name!r}")
    return {"name": name, "tasks": tasks, "command": command}


def content_digest(directory: Path) -> str:
    """Return `sha256:<hex>` over every file's relative path, mode and content, in sorted order."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            digest.update(relative.encode() + b"\0")
            if path.is_symlink():
                digest.update(b"link\0" + os.readlink(path).encode() + b"\0")
                continue
            digest.update(b"%o\0" % (path.stat().st_mode & 0o777))
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _read_manifest(path: Path) -> ImageManifest:
    data = json.loads(path.read_text())
    return ImageManifest(
        name=data["name"],
        tag=data["tag"],
        tasks=list(data["tasks"]),
        digest=data["digest"],
        created_at=data["created_at"],
        command=data.get("command"),
        format=data.get("format", MANIFEST_FORMAT),
    )


__all__ = ["Image", "ImageManifest", "ImageStore", "load_project", "split_reference"]
