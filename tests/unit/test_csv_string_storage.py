"""The annotation CSV reader gives the same rows and counts whichever storage pandas would pick for strings.

pandas 3 stores strings in Arrow when pyarrow is installed ("auto" storage); Arrow strings must be valid UTF-8, so
the lone surrogates that stand for an undecodable byte would refuse the whole CSV. Each case here reads the same
file with pandas' default string storage set to Arrow and to Python, and compares both to the hand-written
expectation.
"""
from __future__ import annotations

import pandas as pd
import pytest

from zvl_ds.data.writing import annotations

pytest.importorskip("pyarrow")  # pandas' Arrow string storage needs it (CI installs it: the parquet extra)

STORAGES = ["pyarrow", "python"]


@pytest.mark.parametrize("storage", STORAGES)
def test_one_undecodable_caption_is_one_counted_row_under_either_storage(tmp_path, storage):
    path = tmp_path / "train_anno.csv"
    path.write_bytes(b"image,caption\na.jpg,fine\nb.jpg,bad \xff byte\nc\xfe.jpg,odd name\na.jpg,second\n")
    with pd.option_context("mode.string_storage", storage):
        frame, malformed = annotations.read_csv_frame(str(path))
        grouped = annotations.group_by_image(frame, malformed)
        annotations.check_csv(str(path))  # the head read of the same file is accepted too
    assert grouped.row_failures.counts == {"invalid_utf8": 1}
    assert "b.jpg (data row 2)" in grouped.row_failures.examples["invalid_utf8"][0]
    by_image = {entry.image: entry.captions for entry in grouped.entries}
    # the undecodable file name is kept as written (the writer reports it per image, as a missing or bad file)
    assert by_image == {"a.jpg": ["fine", "second"], "b.jpg": [], "c\udcfe.jpg": ["odd name"]}
    assert grouped.rows_read == 4


@pytest.mark.parametrize("storage", STORAGES)
def test_a_binary_header_is_named_as_such_under_either_storage(tmp_path, storage):
    path = tmp_path / "train_anno.csv"
    path.write_bytes(b"\x89PNG\xff\x00junk,more\x01\n1,2\n")
    with pd.option_context("mode.string_storage", storage):
        with pytest.raises(annotations.InputError, match=r"missing required column.*the header is not UTF-8 text"):
            annotations.read_csv_frame(str(path))
        with pytest.raises(annotations.InputError, match=r"the header is not UTF-8 text"):
            annotations.check_csv(str(path))
