"""The folders a run creates are the only ones it removes, and only while they are empty."""

from train.folders import make_folders, remove_empty_folders


def test_make_folders_returns_only_the_folders_it_created_outermost_first(tmp_path):
    (tmp_path / "a").mkdir()
    assert make_folders(tmp_path / "a" / "b" / "c") == [tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert make_folders(tmp_path / "a" / "b") == []


def test_a_folder_that_holds_anything_stays_and_so_do_its_parents(tmp_path):
    created = make_folders(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "kept.txt").write_text("")
    remove_empty_folders(created)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/kept.txt"]
    (tmp_path / "a" / "b" / "kept.txt").unlink()
    remove_empty_folders(created)
    assert list(tmp_path.iterdir()) == []
