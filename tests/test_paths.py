"""Paths remote callers name are confined to the run directory."""

from __future__ import annotations

import pytest

from k1rl.paths import PathOutsideRunError, confine


def test_a_path_inside_the_run_resolves_and_a_relative_one_is_taken_in_the_run(tmp_path):
    assert confine(tmp_path / "ckpt" / "iter-3", tmp_path) == tmp_path.resolve() / "ckpt/iter-3"
    assert confine("ckpt/iter-3", tmp_path) == tmp_path.resolve() / "ckpt/iter-3"
    assert confine(tmp_path, tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("path", ["/etc/passwd", "../sibling", "ckpt/../../sibling", "~/x"])
def test_a_path_leading_out_of_the_run_is_refused(tmp_path, path):
    with pytest.raises(PathOutsideRunError, match="is outside the run directory"):
        confine(path, tmp_path / "run")


def test_a_symlink_out_of_the_run_is_followed_and_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathOutsideRunError):
        confine("link/ckpt", run)


def test_a_sibling_sharing_the_runs_name_as_prefix_is_outside(tmp_path):
    with pytest.raises(PathOutsideRunError):
        confine(tmp_path / "run-other" / "x", tmp_path / "run")
