"""A small, independent protobuf reader/writer, so the tests check Ember's
decoding against a second implementation instead of against itself."""

import gzip


def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf):
    """Yields (field number, wire type, value) of a message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wt == 2:
            n, i = varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, v


def signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def repeated_varints(wt, v):
    if wt == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = varint(v, i)
        out.append(x)
    return out


def graph_fields(graph):
    """A querier.v1 FlameGraph or FlameGraphDiff message -> (names, levels,
    {field number: value} of its integer fields), levels as sent."""
    names, levels, scalars = [], [], {}
    for n, wt, v in fields(graph):
        if n == 1:
            names.append(v.decode())
        elif n == 2:
            values = []
            for m, wt2, x in fields(v):
                if m == 1:
                    values += [signed(y) for y in repeated_varints(wt2, x)]
            levels.append(values)
        else:
            scalars[n] = signed(v)
    return names, levels, scalars


def flame_graph_levels(buf):
    """SelectMergeStacktracesResponse bytes -> (names, levels, total, max_self)
    of its querier.v1.FlameGraph, levels as sent (4 ints per bar)."""
    graph = next(v for n, _, v in fields(buf) if n == 1)
    names, levels, scalars = graph_fields(graph)
    return names, levels, scalars.get(3, 0), scalars.get(4, 0)


def load_pprof(raw):
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    p = {"sample_type": [], "sample": [], "location": {}, "function": {}, "strings": [], "period_type": (0, 0)}
    for num, wt, v in fields(raw):
        if num == 1:
            t = dict((n, x) for n, _, x in fields(v))
            p["sample_type"].append((t.get(1, 0), t.get(2, 0)))
        elif num == 2:
            s = {"loc": [], "val": [], "labels": []}
            for n, w, x in fields(v):
                if n == 1:
                    s["loc"] += repeated_varints(w, x)
                elif n == 2:
                    s["val"] += [signed(y) for y in repeated_varints(w, x)]
                elif n == 3:
                    lab = dict((a, b) for a, _, b in fields(x))
                    s["labels"].append((lab.get(1, 0), lab.get(2, 0)))
            p["sample"].append(s)
        elif num == 4:
            loc = {"id": 0, "addr": 0, "lines": []}
            for n, w, x in fields(v):
                if n == 1:
                    loc["id"] = x
                elif n == 3:
                    loc["addr"] = x
                elif n == 4:
                    line = dict((a, b) for a, _, b in fields(x))
                    loc["lines"].append(line.get(1, 0))
            # ids left unset (0) refer to entries by 1-based position.
            loc["id"] = loc["id"] or len(p["location"]) + 1
            p["location"][loc["id"]] = loc
        elif num == 5:
            f = dict((n, x) for n, _, x in fields(v))
            p["function"][f.get(1, 0) or len(p["function"]) + 1] = (f.get(2, 0), f.get(3, 0))
        elif num == 6:
            p["strings"].append(bytes(v).decode("utf-8", "replace"))
        elif num == 11:
            t = dict((n, x) for n, _, x in fields(v))
            p["period_type"] = (t.get(1, 0), t.get(2, 0))
    return p


def frame_names(p, loc_id):
    """Names of a location's frames, root-most first."""
    loc = p["location"][loc_id]
    if not loc["lines"]:
        return [f"0x{loc['addr']:x}"]
    names = []
    for fid in loc["lines"]:
        name, system = p["function"][fid]
        names.append(p["strings"][name] or p["strings"][system])
    return list(reversed(names))


def profile_types(p, name):
    s = p["strings"]
    pt, pu = p["period_type"]
    return [f"{name}:{s[t]}:{s[u]}:{s[pt]}:{s[pu]}" for t, u in p["sample_type"]]


def totals(p, name):
    """profile type -> sum of values."""
    out = {}
    for i, pt in enumerate(profile_types(p, name)):
        out[pt] = out.get(pt, 0) + sum(s["val"][i] for s in p["sample"])
    return {k: v for k, v in out.items() if v != 0}


def folded(p, index, label_filter=None):
    """'root;...;leaf' -> value for sample type `index`."""
    out = {}
    s = p["strings"]
    for smp in p["sample"]:
        v = smp["val"][index]
        if v == 0:
            continue
        if label_filter is not None:
            labels = {s[k]: s[x] for k, x in smp["labels"] if x}
            if any(labels.get(k) != want for k, want in label_filter.items()):
                continue
        names = []
        for loc in reversed(smp["loc"]):
            names += frame_names(p, loc)
        key = ";".join(names)
        out[key] = out.get(key, 0) + v
    return {k: v for k, v in out.items() if v != 0}


def period_name(p):
    s = p["strings"]
    pt = s[p["period_type"][0]]
    types = [s[t] for t, _ in p["sample_type"]]
    if pt == "cpu" or "cpu" in types:
        return "process_cpu"
    if pt == "space" or any("alloc" in t or "inuse" in t for t in types):
        return "memory"
    return "unknown"


# --- writing push.v1.PushRequest ---

def _key(num, wt):
    return _varint((num << 3) | wt)


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _bytes_field(num, data):
    return _key(num, 2) + _varint(len(data)) + data


def push_request(series):
    """series: [(labels dict, [raw profile bytes])] -> PushRequest bytes."""
    out = b""
    for labels, profiles in series:
        body = b""
        for k, v in labels.items():
            body += _bytes_field(1, _bytes_field(1, k.encode()) + _bytes_field(2, v.encode()))
        for raw in profiles:
            body += _bytes_field(2, _bytes_field(1, raw))
        out += _bytes_field(1, body)
    return out


def flight_sql_command(query):
    """Any{CommandStatementQuery{query}} as Flight SQL clients send it."""
    cmd = _bytes_field(1, query.encode())
    url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return _bytes_field(1, url) + _bytes_field(2, cmd)
