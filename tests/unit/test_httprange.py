import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.errors import RangeNotSatisfiable
from nixery_trio.core.httprange import parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, (0, 99)),
        ("bytes=100-", 1000, (100, 999)),
        ("bytes=-100", 1000, (900, 999)),
        ("bytes=-5000", 1000, (0, 999)),
        ("bytes=990-5000", 1000, (990, 999)),
        ("bytes=0-0", 1, (0, 0)),
        (" bytes=1-2 ", 10, (1, 2)),
    ],
)
def test_served_ranges(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=5-1",  # reversed
        "bytes=1000-",  # past the end
        "bytes=2000-3000",
        "bytes=0-1,5-6",  # several
        "items=0-1",  # another unit
        "bytes=",
        "bytes=-",
        "bytes=-0",
        "bytes=a-b",
        "bytes=0x10-20",
        "garbage",
        "bytes=99999999999999999999-",
    ],
)
def test_refused_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 1000)
    assert info.value.status == 416
    assert info.value.detail == {"size": 1000}


@given(st.integers(0, 10**6), st.text(max_size=40))
def test_any_header_is_served_inside_the_blob_or_refused(size: int, header: str) -> None:
    try:
        first, last = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    assert 0 <= first <= last < size


@given(st.integers(1, 10**9), st.data())
def test_well_formed_ranges_stay_inside(size: int, data: st.DataObject) -> None:
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size * 2))
    assert parse_range(f"bytes={first}-{last}", size) == (first, min(last, size - 1))
