"""adapter_roots: checked after resolving `..` and symlinks, for the directory and each file read."""

from __future__ import annotations

import os
import shutil

import pytest

from omni_engine.errors import AdapterAccessError
from omni_engine.lora.request import LoRARequest


@pytest.fixture
def rooted(tmp_path, make_adapter, omni_factory):
    """An engine whose only allowed root is tmp/root (itself reached through a symlink)."""
    real_root = tmp_path / "real-root"
    real_root.mkdir()
    root = tmp_path / "root"
    root.symlink_to(real_root)
    outside = make_adapter("outside")
    inside = real_root / "inside"
    shutil.copytree(outside, inside)
    return omni_factory(adapter_roots=[str(root)]), root, inside, outside


def _request(path) -> LoRARequest:
    return LoRARequest("probe", 1, str(path))


def test_adapter_inside_the_root_loads(rooted):
    omni, root, _, _ = rooted
    output = omni.generate("x", seed=1, lora_request=_request(root / "inside"))[0]
    assert output.metadata["adapter_source"] == "disk"


def test_dotdot_escape_is_refused(rooted):
    omni, root, _, outside = rooted
    sneaky = root / ".." / os.path.relpath(outside, root.parent)
    with pytest.raises(AdapterAccessError, match="outside the allowed adapter roots"):
        omni.generate("x", seed=1, lora_request=_request(sneaky))


def test_absolute_path_outside_is_refused_even_if_missing(rooted, tmp_path):
    omni, _, _, _ = rooted
    with pytest.raises(AdapterAccessError):
        omni.generate("x", seed=1, lora_request=_request(tmp_path / "does-not-exist"))


def test_directory_symlink_escape_is_refused(rooted):
    omni, root, _, outside = rooted
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterAccessError):
        omni.generate("x", seed=1, lora_request=_request(root / "link"))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_file_symlink_escape_is_refused(rooted, name):
    omni, root, inside, outside = rooted
    (inside / name).unlink()
    (inside / name).symlink_to(outside / name)
    with pytest.raises(AdapterAccessError, match=name):
        omni.generate("x", seed=1, lora_request=_request(root / "inside"))
    assert omni.list_loras() == []
