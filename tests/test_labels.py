"""--merge's grammar (training.labels): members joined by '+', a '+' inside a class name written '\\+'; an
exact class name wins, and what could be read two ways is refused in one line that shows the escape."""
import pytest

from cli import UsageError
from training.labels import merge_classes, merge_spec

PLUS = ["A", "A+B", "B", "C"]  # class names with a '+' in one of them (issue 19 item 6)


def test_plain_names_merge_in_place_of_the_first_member():
    assert merge_classes(["A", "B", "C"], ["C+A"]) == (["C+A", "B"], [0, 1, 0])


def test_a_spec_that_is_one_class_name_is_that_class_never_a_merge_of_its_parts():
    with pytest.raises(UsageError) as err:
        merge_classes(PLUS, ["A+B"])
    line = str(err.value)
    assert "\n" not in line and "A+B is the name of one class" in line and "\\+" in line


def test_a_plus_inside_a_name_is_escaped_and_then_merges_exactly_those_classes():
    assert merge_classes(PLUS, ["A\\+B+C"]) == (["A", "A+B+C", "B"], [0, 1, 2, 1])
    assert merge_classes(PLUS, ["B+C"]) == (["A", "A+B", "B+C"], [0, 1, 2, 2])  # only one reading


def test_a_spec_read_two_ways_is_refused_with_the_escape_shown():
    with pytest.raises(UsageError) as err:
        merge_classes(["A", "A+B", "B", "B+C", "C"], ["A+B+C"])
    line = str(err.value)
    assert "\n" not in line and "ambiguous" in line
    assert "A | B+C" in line and "A+B | C" in line and "'A\\+B+C'" in line


def test_a_merged_name_that_is_another_class_is_refused():
    with pytest.raises(UsageError, match="would be named A\\+B\\+C, like the class A\\+B\\+C"):
        merge_classes(["A+B", "C", "A+B+C"], ["A\\+B+C"])


def test_a_class_listed_twice_says_so():
    with pytest.raises(UsageError, match="^--merge 'A\\+A' lists A twice$"):
        merge_classes(["A", "B"], ["A+A"])
    with pytest.raises(UsageError, match="^--merge 'A\\+B' is given twice$"):
        merge_classes(["A", "B", "C"], ["A+B", "A+B"])
    with pytest.raises(UsageError, match="^--merge: B is in two merges \\(A\\+B and B\\+C\\)$"):
        merge_classes(["A", "B", "C"], ["A+B", "B+C"])


def test_unknown_or_single_members_list_the_classes():
    with pytest.raises(UsageError, match="join two or more of these classes with '\\+': A, B"):
        merge_classes(["A", "B"], ["A+D"])
    with pytest.raises(UsageError, match="fewer than 2"):
        merge_classes(["A", "B"], ["A+B"])


def test_merge_spec_writes_what_merge_classes_reads():
    for members in (["A", "C"], ["B", "C"], ["A+B", "C"], ["C", "A+B"]):
        names, _ = merge_classes(PLUS, [merge_spec(members)])
        assert "+".join(members) in names
