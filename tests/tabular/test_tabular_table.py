"""Reading patient tables from real CSV files: every bad input is one clear DataError."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privmed.errors import DataError
from privmed.tabular.table import (
    date_values,
    numeric_values,
    read_table,
    require_columns,
    table_id,
    write_csv_atomic,
    write_json_atomic,
)


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_reads_text_cells_stripped_and_keeps_leading_zeros(tmp_path):
    df = read_table(write(tmp_path / "t.csv", "id, postcode ,age\n1, 02139 ,34\n2,00501,\n"))
    assert list(df.columns) == ["id", "postcode", "age"]
    assert df["postcode"].tolist() == ["02139", "00501"]  # nothing parsed as a number
    assert df["age"].tolist() == ["34", ""]  # a missing cell is "", never NaN


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "binary"),
    (b"name,age\n\xff\xfeJ\xe9r\xf4me,3\n", "UTF-8"),
    ("", "empty"),
    ("a,b\n", "no data rows"),
    ("a,a,b\n1,2,3\n", "two columns named 'a'"),
    ("a,,b\n1,2,3\n", "without a name"),
    ("a,b,c\n1,2,3\n4,5,6,7\n", "4 fields in data row 2 but 3 columns"),
])
def test_bad_files_are_one_sentence_data_errors(tmp_path, content, words):
    path = tmp_path / "t.csv"
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=words) as err:
        read_table(path)
    assert str(path) in str(err.value) and str(err.value).count(". ") == 0


def test_a_folder_is_not_a_table(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        read_table(tmp_path)


def test_numeric_column_errors_name_column_value_and_row(tmp_path):
    df = read_table(write(tmp_path / "t.csv", "age,w\n34,1\n35.5,2\nforty,3\n"))
    with pytest.raises(DataError, match=r"Column 'age' of t.csv has the non-numeric value "
                                        r"'forty' in row 3"):
        numeric_values(df, "age", "t.csv")
    assert numeric_values(df, "w", "t.csv").tolist() == [1.0, 2.0, 3.0]
    df.loc[1, "w"] = ""
    with pytest.raises(DataError, match="an empty value in row 2"):
        numeric_values(df, "w", "t.csv")
    df.loc[1, "w"] = "inf"
    with pytest.raises(DataError, match="'inf' in row 2"):
        numeric_values(df, "w", "t.csv")


def test_dates_must_be_iso_and_errors_name_the_row(tmp_path):
    df = read_table(write(tmp_path / "t.csv", "d\n1980-03-02\n2001-12-31\n03/04/1990\n"))
    with pytest.raises(DataError, match=r"unparsable date '03/04/1990' in row 3.*YYYY-MM-DD"):
        date_values(df, "d", "t.csv")
    ok = date_values(df.iloc[:2], "d", "t.csv")
    assert ok.dtype == np.dtype("datetime64[D]") and str(ok[0]) == "1980-03-02"
    with pytest.raises(DataError, match="row 1"):
        date_values(pd.DataFrame({"d": ["1980-02-30"]}), "d", "x")  # no such day


def test_missing_columns_are_listed_with_the_option_that_named_them():
    df = pd.DataFrame({"a": ["1"], "b": ["2"]})
    with pytest.raises(DataError, match=r"no column 'x', 'y' named by --quasi \(its columns: "
                                        r"a, b\)"):
        require_columns(df, ["a", "x", "y"], "t.csv", "--quasi")


def test_table_id_ignores_line_ends_and_padding_but_not_content(tmp_path):
    a = read_table(write(tmp_path / "a.csv", "x,y\n1,F\n2,M\n"))
    b = read_table(write(tmp_path / "b.csv", b"x , y\r\n1, F\r\n2,M \r\n"))
    c = read_table(write(tmp_path / "c.csv", "x,y\n1,F\n2,F\n"))
    assert table_id(a) == table_id(b) != table_id(c)
    assert len(table_id(a)) == 16 and int(table_id(a), 16) >= 0


def test_atomic_writes_never_replace_the_input(tmp_path):
    src = write(tmp_path / "in.csv", "a\n1\n")
    df = read_table(src)
    with pytest.raises(DataError, match="Refusing to overwrite"):
        write_csv_atomic(df, tmp_path / "." / "in.csv", protect=[src])
    assert src.read_text() == "a\n1\n"
    out = write_csv_atomic(df, tmp_path / "sub" / "out.csv", protect=[src])
    assert out.read_text() == "a\n1\n"
    write_json_atomic({"x": np.int64(3), "y": np.float64(0.5)}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().split() == ["{", '"x":', "3,", '"y":', "0.5", "}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "r.json", "sub"]  # no temp
    with pytest.raises(DataError, match="is a folder"):
        write_csv_atomic(df, tmp_path / "sub")
