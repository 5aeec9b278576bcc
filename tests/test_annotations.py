"""`reelflow import-labels`: each public dataset's annotation format parsed, matched to a tiny corpus and
written as the labels manifest (read back with pyarrow), the mismatch summary lines, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import annotations as fa
from flows import storage
from flows.labels import MANIFEST_COLUMNS
from jobs import cli
from jobs.import_labels import ImportLabelsConfig, ImportLabelsResult, main


def corpus_of(root: Path, *files: str) -> str:
    """A corpus of dummy video files (listing goes by extension; only TVSum's probe needs real ones)."""
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(b"not a video")
    return str(root)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def manifest_rows(result: ImportLabelsResult) -> dict[str, dict]:
    return {row["file"]: row for row in pq.read_table(result.uri).to_pylist()}


def run(tmp_path: Path, format: str, src: str, *files: str, split: int | None = None) -> ImportLabelsResult:
    corpus = corpus_of(tmp_path / "corpus", *files)
    return main(ImportLabelsConfig(format=format, src=src, corpus=corpus, split=split))


# --- ActivityNet --------------------------------------------------------------------------------------

ACTIVITYNET = {
    "version": "VERSION 1.3",
    "database": {
        "abc": {
            "subset": "training",
            "duration": 30.0,
            "annotations": [
                {"segment": [12.5, 40.0], "label": "Shot put"},
                {"segment": [1.0, 4.25], "label": "Long jump"},
                {"segment": [31.0, 33.0], "label": "Shot put"},  # after the video's end
            ],
        },
        "-xy_z": {"subset": "validation", "duration": 10.0, "annotations": []},
        "tst": {"subset": "testing", "duration": 20.0, "annotations": []},
        "gone": {"subset": "training", "duration": 5.0, "annotations": [{"segment": [0, 1], "label": "Run"}]},
    },
}


def test_activitynet_gives_sorted_clipped_segments_mapped_splits_and_no_truth_for_test_videos(tmp_path):
    src = write(tmp_path / "anno.json", json.dumps(ACTIVITYNET))
    result = run(tmp_path, "activitynet", src, "abc.mp4", "sub/v_-xy_z.mkv", "v_tst.mp4", "other.mp4")
    assert result.columns == ("actions", "split")
    assert manifest_rows(result) == {
        "abc.mp4": {
            "file": "abc.mp4",
            "actions": [
                {"label": "Long jump", "start_s": 1.0, "end_s": 4.25},
                {"label": "Shot put", "start_s": 12.5, "end_s": 30.0},  # clipped to the duration
            ],
            "split": "train",
        },
        "sub/v_-xy_z.mkv": {"file": "sub/v_-xy_z.mkv", "actions": [], "split": "val"},
        "v_tst.mp4": {"file": "v_tst.mp4", "actions": None, "split": "test"},
    }
    assert result.missing == ("gone",)
    assert result.unlabelled == ("other.mp4",)
    assert result.splits == {"train": 1, "val": 1, "test": 1}
    assert (
        result.lines[0] == "activitynet anno.json: dropped 1 segments that start after their video's duration"
    )


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (
            {"segment": [5.0, "x"], "label": "Run"},
            r"^activitynet anno\.json: database\.abc\.annotations\[3\]\.segment: expected \[start, end\] "
            r"numbers, got \[5\.0, 'x'\]$",
        ),
        (
            {"segment": [5.0, 2.0], "label": "Run"},
            r"^activitynet anno\.json: database\.abc\.annotations\[3\]\.segment: expected 0 <= start <= end",
        ),
        (
            {"segment": [1.0, 2.0]},
            r"^activitynet anno\.json: database\.abc\.annotations\[3\]\.label: expected a non-empty label",
        ),
    ],
)
def test_a_malformed_activitynet_segment_is_one_line_naming_its_key(tmp_path, annotation, message):
    data = json.loads(json.dumps(ACTIVITYNET))
    data["database"]["abc"]["annotations"].append(annotation)
    src = write(tmp_path / "anno.json", json.dumps(data))
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "activitynet", src, "abc.mp4")


def test_activitynet_syntax_errors_and_unknown_subsets_name_line_or_key(tmp_path):
    with pytest.raises(ValueError, match=r"^activitynet anno\.json line 3: expected JSON"):
        fa.parse_activitynet('{"database": {\n"a": {},\n]', "anno.json")
    bad = {"database": {"a": {"subset": "train", "annotations": []}}}
    with pytest.raises(
        ValueError, match=r"^activitynet a\.json: database\.a\.subset: expected training, valid"
    ):
        fa.parse_activitynet(json.dumps(bad), "a.json")


# --- Kinetics -----------------------------------------------------------------------------------------

KINETICS = """label,youtube_id,time_start,time_end,split
abseiling,--07WQ2iBlw,1,11,train
air drumming,-01AbCdEfGh,30,40,validate
"zumba, latin",Zz9yX8wV7uT,5,15,test
archery,notThere123,0,10,val
"""


def test_kinetics_windows_are_the_whole_trimmed_clip_or_the_span_of_the_untrimmed_video(tmp_path):
    src = write(tmp_path / "k400.csv", KINETICS)
    files = (
        "train/abseiling/--07WQ2iBlw_000001_000011.mp4",
        "-01AbCdEfGh.mkv",
        "Zz9yX8wV7uT_000005_000015.mp4",
    )
    result = run(tmp_path, "kinetics", src, *files)
    assert result.columns == ("category", "split", "window_start_s", "window_end_s")
    rows = manifest_rows(result)
    assert rows == {
        files[0]: {
            "file": files[0], "category": "abseiling", "split": "train",
            "window_start_s": 0.0, "window_end_s": 10.0,
        },
        files[1]: {
            "file": files[1], "category": "air drumming", "split": "val",
            "window_start_s": 30.0, "window_end_s": 40.0,
        },
        files[2]: {
            "file": files[2], "category": "zumba, latin", "split": "test",
            "window_start_s": 0.0, "window_end_s": 10.0,
        },
    }  # fmt: skip
    assert result.missing == ("notThere123_000000_000010",)


def test_kinetics_file_column_names_the_video_and_no_split_column_gives_no_split(tmp_path):
    src = write(
        tmp_path / "k.csv",
        "label,youtube_id,time_start,time_end,file\n"
        "yoga,aaaaaaaaaaa,3,13,clips/aaaaaaaaaaa_000003_000013.mp4\n"
        "yoga,bbbbbbbbbbb,3,13,full/bbb.webm\n",
    )
    result = run(tmp_path, "kinetics", src, "clips/aaaaaaaaaaa_000003_000013.mp4", "full/bbb.webm")
    assert result.columns == ("category", "window_start_s", "window_end_s")
    windows = {f: (r["window_start_s"], r["window_end_s"]) for f, r in manifest_rows(result).items()}
    assert windows == {"clips/aaaaaaaaaaa_000003_000013.mp4": (0.0, 10.0), "full/bbb.webm": (3.0, 13.0)}
    assert "split" not in pq.read_table(result.uri).column_names


def test_malformed_kinetics_rows_name_the_line(tmp_path):
    with pytest.raises(
        ValueError, match=r"^kinetics k\.csv line 3: time_end: expected a number of seconds, got 'x'$"
    ):
        fa.parse_kinetics("label,youtube_id,time_start,time_end\na,b,1,2\na,c,1,x\n", "k.csv")
    with pytest.raises(ValueError, match=r"^kinetics k\.csv line 2: split: expected train, val"):
        fa.parse_kinetics("label,youtube_id,time_start,time_end,split\na,b,1,2,dev\n", "k.csv")
    with pytest.raises(ValueError, match=r"^kinetics k\.csv line 1: expected a header with youtube_id"):
        fa.parse_kinetics("name,start,end\n", "k.csv")


# --- TVSum --------------------------------------------------------------------------------------------


def test_tvsum_importance_is_the_annotators_mean_at_the_probed_frame_rate(tmp_path, shared_videos):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shared_videos / "media/bbb_176x144_192kbps_15fps_mpeg4.mp4", corpus / "AwmHb44_ouw.mp4")
    shutil.copy(shared_videos / "file-type/fixture-mjpeg.mov", corpus / "98MoyGZKHXc.mov")
    rng = np.random.default_rng(0)
    scores = {"AwmHb44_ouw": rng.integers(1, 6, (3, 15)), "98MoyGZKHXc": rng.integers(1, 6, (2, 15))}
    lines = [
        f"{video}\tVT\t{','.join(str(s) for s in row)}" for video, rows in scores.items() for row in rows
    ]
    src = write(tmp_path / "ydata-tvsum50-anno.tsv", "\n".join(lines) + "\n")
    result = main(ImportLabelsConfig(format="tvsum", src=src, corpus=str(corpus)))
    assert result.columns == ("importance", "importance_fps")
    table = pq.read_table(result.uri)
    assert table.column_names == ["file", "importance", "importance_fps"]
    assert table.schema.field("importance").type == pa.list_(pa.float32())
    rows = manifest_rows(result)
    for video, file, fps in (
        ("AwmHb44_ouw", "AwmHb44_ouw.mp4", 15.0),
        ("98MoyGZKHXc", "98MoyGZKHXc.mov", 10.0),
    ):
        np.testing.assert_array_equal(
            np.array(rows[file]["importance"], dtype=np.float32),
            scores[video].mean(axis=0).astype(np.float32),
        )
        assert rows[file]["importance_fps"] == fps
    assert result.lines == (f"import-labels: wrote 2 videos (heads importance) to {corpus}/labels.parquet",)


def test_tvsum_annotators_must_score_the_same_number_of_frames(tmp_path):
    text = "vid\tVT\t1,2,3\nvid\tVT\t1,2\n"
    with pytest.raises(ValueError, match=r"^tvsum anno\.tsv line 2: expected 3 scores for vid, .*got 2$"):
        fa.parse_tvsum(text, "anno.tsv")
    with pytest.raises(ValueError, match=r"^tvsum anno\.tsv line 1: expected comma-separated numbers"):
        fa.parse_tvsum("vid\tVT\t1,two\n", "anno.tsv")


# --- UCF101 -------------------------------------------------------------------------------------------


def ucf101_lists(folder: Path) -> str:
    write(folder / "classInd.txt", "1 ApplyEyeMakeup\r\n2 Archery\r\n3 YoYo\r\n")
    write(
        folder / "trainlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nArchery/v_Archery_g08_c01.avi 2\r\n",
    )
    write(folder / "testlist01.txt", "YoYo/v_YoYo_g01_c01.avi\r\nYoYo/v_YoYo_g02_c01.avi\r\n")
    write(folder / "trainlist02.txt", "YoYo/v_YoYo_g01_c01.avi 3\r\nArchery/v_Archery_g08_c01.avi 2\r\n")
    write(folder / "testlist02.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\r\n")
    return str(folder)


UCF_FILES = (
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Archery/v_Archery_g08_c01.avi", "YoYo/v_YoYo_g01_c01.avi",
)  # fmt: skip


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        (None, {UCF_FILES[0]: ("ApplyEyeMakeup", "train"), UCF_FILES[1]: ("Archery", "train"),
                UCF_FILES[2]: ("YoYo", "test")}),
        (2, {UCF_FILES[0]: ("ApplyEyeMakeup", "test"), UCF_FILES[1]: ("Archery", "train"),
             UCF_FILES[2]: ("YoYo", "train")}),
    ],
)  # fmt: skip
def test_ucf101_split_lists_give_category_and_split(tmp_path, split, expected):
    result = run(tmp_path, "ucf101", ucf101_lists(tmp_path / "lists"), *UCF_FILES, split=split)
    assert result.columns == ("category", "split")
    assert {f: (r["category"], r["split"]) for f, r in manifest_rows(result).items()} == expected
    assert result.missing == (("YoYo/v_YoYo_g02_c01.avi",) if split is None else ())


def test_malformed_ucf101_lists_name_the_file_and_line(tmp_path):
    lists = ucf101_lists(tmp_path / "lists")
    write(tmp_path / "lists/trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nfoo\n")
    with pytest.raises(ValueError) as err:
        run(tmp_path, "ucf101", lists, *UCF_FILES)
    assert str(err.value) == "ucf101 trainlist01.txt line 2: expected \"<path> <class index>\", got 'foo'"
    write(tmp_path / "lists/trainlist01.txt", "Archery/v_Archery_g08_c01.avi 1\n")
    with pytest.raises(
        ValueError, match=r"line 1: class index 1 is 'ApplyEyeMakeup' but the folder is 'Archery'"
    ):
        run(tmp_path, "ucf101", lists, *UCF_FILES)
    write(tmp_path / "lists/trainlist01.txt", "Archery/v_Archery_g08_c01.avi 9\n")
    with pytest.raises(ValueError, match=r"line 1: class index 9 is not in classInd \(1\.\.3\)"):
        run(tmp_path, "ucf101", lists, *UCF_FILES)
    with pytest.raises(FileNotFoundError, match=r"^ucf101 .*/lists/trainlist03\.txt: not found$"):
        write(tmp_path / "lists/testlist03.txt", "")
        run(tmp_path, "ucf101", lists, *UCF_FILES, split=3)


# --- folders and tables -------------------------------------------------------------------------------


def test_folders_label_each_video_with_its_parent_folder(tmp_path, capsys):
    files = ("a/cat/1.mp4", "dog/2.avi", "root.mp4")
    result = run(tmp_path, "folders", "-", *files)
    assert result.columns == ("category",)
    assert {f: r["category"] for f, r in manifest_rows(result).items()} == {files[0]: "cat", files[1]: "dog"}
    assert result.unlabelled == ("root.mp4",)
    assert "1 corpus videos without annotations, e.g. root.mp4\n" in capsys.readouterr().err
    with pytest.raises(ValueError, match="folders: SRC must be the corpus itself or -"):
        main(ImportLabelsConfig(format="folders", src=str(tmp_path), corpus=str(tmp_path / "corpus")))


def test_a_csv_table_keeps_its_known_columns_parses_json_lists_and_warns_of_the_rest(tmp_path):
    actions = json.dumps([{"label": "jump", "start_s": 1, "end_s": 2.5}])
    src = write(
        tmp_path / "labels.csv",
        "file,category,valence,actions,split,source,notes\n"
        f'a.mp4,cat,0.5,"{actions.replace(chr(34), chr(34) * 2)}",train,web,x\n'
        "sub/b.mp4,,,[],validation,web,\n",
    )
    result = run(tmp_path, "table", src, "a.mp4", "sub/b.mp4")
    assert result.columns == ("category", "valence", "actions", "split")
    assert manifest_rows(result) == {
        "a.mp4": {
            "file": "a.mp4", "category": "cat", "valence": 0.5, "split": "train",
            "actions": [{"label": "jump", "start_s": 1.0, "end_s": 2.5}],
        },
        "sub/b.mp4": {"file": "sub/b.mp4", "category": None, "valence": None, "actions": [], "split": "val"},
    }  # fmt: skip
    assert result.lines[0] == "table labels.csv: ignored unknown columns ['source', 'notes']"
    bad = 'file,actions\na.mp4,[]\nb.mp4,"[{""label"": ""x""}]"\n'
    with pytest.raises(
        ValueError, match=r"^table t\.csv line 3: actions: expected a list of \{label, start_s"
    ):
        fa.parse_table_csv(bad, "t.csv")
    with pytest.raises(ValueError, match=r"^table t\.csv line 2: valence: expected a number in \[-1, 1\]"):
        fa.parse_table_csv("file,valence\na.mp4,3\n", "t.csv")


def test_a_parquet_table_is_read_with_its_types(tmp_path):
    rows = [
        {"file": "x/a.mp4", "highlights": [{"start_s": 0.5, "end_s": 1.0}], "sentiment": "positive"},
        {"file": "b.mp4", "highlights": None, "sentiment": "negative"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labels-src.parquet")
    result = run(tmp_path, "table", str(tmp_path / "labels-src.parquet"), "x/a.mp4", "b.mp4", "c.mp4")
    assert result.columns == ("highlights", "sentiment")
    assert manifest_rows(result) == {row["file"]: row for row in rows}
    assert result.unlabelled == ("c.mp4",)


# --- matching and reporting ---------------------------------------------------------------------------


def test_mismatches_are_one_summary_line_each_with_three_examples(tmp_path, capsys):
    ids = [f"id{i}" for i in range(5)]
    data = {"database": {i: {"subset": "training", "annotations": []} for i in ids}}
    src = write(tmp_path / "anno.json", json.dumps(data))
    files = ("id0.mp4", "u1.mp4", "u2.mp4", "u3.mp4", "u4.mp4")
    result = run(tmp_path, "activitynet", src, *files)
    corpus = tmp_path / "corpus"
    assert result.lines == (
        "4 annotated videos not in the corpus, e.g. id1, id2, id3, ...",
        "4 corpus videos without annotations, e.g. u1.mp4, u2.mp4, u3.mp4, ...",
        f"import-labels: wrote 1 videos (heads actions; split train 1) to {corpus}/labels.parquet",
    )
    assert capsys.readouterr().err.splitlines() == list(result.lines)


def test_a_video_named_twice_keeps_the_first_annotation():
    videos = tuple(fa.Annotation(s, (fa.Candidate("x", True, {"category": s}),)) for s in ("first", "second"))
    matched = fa.match(fa.Annotations(("category",), videos), ["x.mp4", "y/x.avi"])
    assert matched.rows == [{"file": "x.mp4", "category": "first"}, {"file": "y/x.avi", "category": "first"}]
    assert matched.repeated == ["x.mp4", "y/x.avi"]
    assert matched.missing == [] and matched.unlabelled == []


def test_no_annotated_video_in_the_corpus_and_a_missing_source_are_one_line_errors(tmp_path):
    src = write(tmp_path / "k.csv", KINETICS)
    with pytest.raises(ValueError, match=r"^import-labels: none of the 4 videos kinetics .* annotates is in"):
        run(tmp_path, "kinetics", src, "unrelated.mp4")
    with pytest.raises(FileNotFoundError, match=r"^kinetics .*/nope\.csv: not found$"):
        run(tmp_path, "kinetics", str(tmp_path / "nope.csv"), "a.mp4")
    with pytest.raises(ValueError, match=r"--split is UCF101's, not kinetics's"):
        run(tmp_path, "kinetics", src, "a.mp4", split=2)


def test_sources_and_corpora_on_s3(s3_bucket, shared_videos):
    corpus = f"{s3_bucket}/corpus"
    for file in ("abc.mp4", "sub/v_-xy_z.mkv", "v_tst.mp4"):
        storage.write_bytes(f"{corpus}/{file}", b"not a video")
    storage.write_bytes(f"{s3_bucket}/anno/anno.json", json.dumps(ACTIVITYNET).encode())
    result = main(ImportLabelsConfig(format="activitynet", src=f"{s3_bucket}/anno/anno.json", corpus=corpus))
    assert result.uri == f"{corpus}/labels.parquet"
    fs, path = storage.arrow_filesystem(result.uri)
    table = pq.read_table(path, filesystem=fs)
    assert table.column("file").to_pylist() == ["abc.mp4", "sub/v_-xy_z.mkv", "v_tst.mp4"]
    assert table.column("split").to_pylist() == ["train", "val", "test"]
    storage.put_file(str(shared_videos / "file-type/fixture-mjpeg.mov"), f"{corpus}/tv/98MoyGZKHXc.mov")
    storage.write_bytes(f"{s3_bucket}/anno.tsv", b"98MoyGZKHXc\tVT\t" + b",".join([b"2"] * 15))
    result = main(ImportLabelsConfig(format="tvsum", src=f"{s3_bucket}/anno.tsv", corpus=corpus))
    assert pq.read_table(path, filesystem=fs).to_pylist() == [
        {"file": "tv/98MoyGZKHXc.mov", "importance": [2.0] * 15, "importance_fps": 10.0}
    ]


# --- the command --------------------------------------------------------------------------------------


def test_the_command_writes_exactly_the_source_heads_and_overwrites_the_manifest(tmp_path, capsys):
    corpus = corpus_of(tmp_path / "corpus", *UCF_FILES, "YoYo/v_YoYo_g02_c01.avi")
    pq.write_table(pa.table({"file": ["old.mp4"], "sentiment": ["neutral"]}), f"{corpus}/labels.parquet")
    lists = ucf101_lists(tmp_path / "lists")
    assert cli.main(["import-labels", "ucf101", lists, "--corpus", corpus, "--split", "1"]) == 0
    table = pq.read_table(f"{corpus}/labels.parquet")
    assert table.column_names == ["file", "category", "split"]
    assert table.schema == pa.schema({c: MANIFEST_COLUMNS[c] for c in table.column_names})
    assert table.num_rows == 4
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"import-labels: wrote 4 videos (heads category; split train 2 / test 2) to {corpus}/labels.parquet"
    )
    src = write(tmp_path / "k.csv", "label,youtube_id,time_start,time_end\nyoyo,v_YoYo_g01_c01,0,4\n")
    assert cli.main(["import-labels", "kinetics", src, "--corpus", corpus]) == 0
    assert pq.read_table(f"{corpus}/labels.parquet").column_names == [
        "file", "category", "window_start_s", "window_end_s",
    ]  # fmt: skip


def test_the_command_rejects_unknown_formats_and_reports_errors_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["import-labels", "hmdb51", "x", "--corpus", str(tmp_path)])
    assert exit.value.code == 2
    assert "invalid choice: 'hmdb51'" in capsys.readouterr().err
    corpus = corpus_of(tmp_path / "corpus", "a.mp4")
    assert cli.main(["import-labels", "tvsum", str(tmp_path / "anno.tsv"), "--corpus", corpus]) == 2
    assert capsys.readouterr().err == f"reelflow import-labels: error: tvsum {tmp_path}/anno.tsv: not found\n"
    for format in fa.FORMATS:  # the command's choices, which it lists without importing the parsers
        assert cli.build_parser().parse_args(["import-labels", format, "-", "--corpus", "c"]).format == format
