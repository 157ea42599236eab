"""--merge: class groups trained as one, by a label map the run applies on the device (no re-ingest).

The grammar: class names joined with '+'; a '+' that belongs to a class name is written '\\+'. Class names may
hold '+' themselves, so a spec is read only where that is unambiguous: a spec that is exactly one class's name
is that class (never a merge of its parts), and a spec that splits into known classes in more than one way is
refused with the escaped spellings to choose from. A spec that escapes a '+' is explicit: its other '+' only
join members."""
import re

from cli import UsageError

ESCAPED_PLUS = "\\+"


def merge_spec(members):
    """The --merge spec of `members`, escaping each '+' inside a name: what merge_classes reads back."""
    return "+".join(name.replace("+", ESCAPED_PLUS) for name in members)


def readings(tokens, classes):
    """Every way to join consecutive `tokens` (the spec split at each '+') into class names: member lists."""
    if not tokens:
        return [[]]
    out = []
    for stop in range(1, len(tokens) + 1):
        name = "+".join(tokens[:stop])
        if name in classes:
            out += [[name, *rest] for rest in readings(tokens[stop:], classes)]
    return out


def parse_merge(spec, classes):
    """One --merge spec -> its member class names, or a UsageError that says why it cannot be read."""
    if ESCAPED_PLUS in spec:  # a spec that escapes is explicit: its other '+' only join members
        found = [[name.replace(ESCAPED_PLUS, "+") for name in re.split(r"(?<!\\)\+", spec)]]
        found = found if all(name in classes for name in found[0]) else []
    else:
        found = readings(spec.split("+"), set(classes))
    one = next((members[0] for members in found if len(members) == 1), None)
    if one is not None:  # an exact class name wins
        raise UsageError(f"--merge '{spec}': {one} is the name of one class, and a merge joins two or more; "
                         f"write a '+' inside a class name as '\\+', e.g. --merge '{merge_spec([one, 'OTHER'])}'")
    if not found:
        raise UsageError(f"--merge '{spec}': join two or more of these classes with '+': {', '.join(classes)} "
                         "(write a '+' inside a class name as '\\+')")
    if len(found) > 1:
        ways = ", or ".join(" | ".join(members) for members in found)
        spellings = " or ".join(f"'{merge_spec(m)}'" for m in found if ESCAPED_PLUS in merge_spec(m))
        raise UsageError(f"--merge '{spec}' is ambiguous ({ways}): write a '+' inside a class name as '\\+' "
                         f"(--merge {spellings}), or rename the class folders that hold '+'")
    return found[0]


def merge_classes(classes, merges):
    """--merge "A+B": (class names after merging, new label of every old label). A merged class takes the place
    of its first member and is named by its members joined with '+', as given."""
    group, spec_of, sets = {}, {}, set()  # class -> its merged name, merged name -> spec, member sets seen
    for spec in merges:
        members = parse_merge(spec, classes)
        name = "+".join(members)
        twice = next((m for m in members if members.count(m) > 1), None)
        if twice is not None:
            raise UsageError(f"--merge '{spec}' lists {twice} twice")
        if frozenset(members) in sets:
            raise UsageError(f"--merge '{spec}' is given twice")
        if name in classes:
            raise UsageError(f"--merge '{spec}': the merged class would be named {name}, like the class {name}: "
                             "rename one of them")
        for m in members:
            if m in group:
                raise UsageError(f"--merge: {m} is in two merges ({spec_of[group[m]]} and {spec})")
            group[m] = name
        spec_of[name] = spec
        sets.add(frozenset(members))
    names = list(dict.fromkeys(group.get(c, c) for c in classes))
    if len(names) < 2:
        raise UsageError("--merge leaves fewer than 2 classes: nothing to classify")
    return names, [names.index(group.get(c, c)) for c in classes]
