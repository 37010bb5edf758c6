#!/usr/bin/env python3
"""The Grafana dashboard's panels, without Grafana (scripts/dashboard runs this).

  dashboard.py drive  --grpc 127.0.0.1:PORT --database-url URL --seconds N
      Mixed traffic for N seconds, through h2load (one gRPC request body per
      run, encoded here): hot and random reads, ids that do not exist, invalid
      requests, list pages, writes through the API, a burst of writes, and a
      bulk reprice in SQL that only the outbox relay invalidates. It varies
      over the run: quiet, busy, a write burst, quiet again.

  dashboard.py render --prometheus URL --start T --end T --out docs/dashboard.png
      Evaluates every target's `expr` of deploy/grafana/dashboards/readthrough.json
      with Prometheus's query_range over [start, end] and draws the panels where
      their gridPos puts them. Exits 1, naming the panel and the query, when
      Prometheus rejects a query or one returns no series (apart from the few
      that a healthy run has none of: KNOWN_ABSENT says which and why).

Standard library and matplotlib only.
"""

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dashboards", "readthrough.json")

# ---------------------------------------------------------------------------
# drive: the traffic
# ---------------------------------------------------------------------------


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1  # negative int32/int64 are ten-byte varints
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def integer(number, value):
    return varint(number << 3) + varint(value)


def field_mask(*paths):
    return b"".join(length_delimited(1, path) for path in paths)


def struct_of_strings(fields):
    """google.protobuf.Struct of string values: map<string, Value> fields = 1."""
    out = b""
    for key, value in fields.items():
        entry = length_delimited(1, key) + length_delimited(2, length_delimited(3, value))  # Value.string_value = 3
        out += length_delimited(1, entry)
    return out


# The request messages (client/proto/readthrough/v1/*.proto), by field number.
def get_by_id(id_):
    return length_delimited(1, id_)


def batch_get_users(ids):
    return b"".join(length_delimited(1, id_) for id_ in ids)


def list_products(category, page, page_size):
    return length_delimited(1, category) + integer(2, page) + integer(3, page_size)


def update_user_preferences(id_, theme):
    user = length_delimited(1, id_) + length_delimited(3, struct_of_strings({"theme": theme}))
    return length_delimited(1, user) + length_delimited(2, field_mask("preferences"))


def update_product(id_, price_cents=None, name=None):
    product = length_delimited(1, id_)
    paths = []
    if name is not None:
        product += length_delimited(3, name)
        paths.append("name")
    if price_cents is not None:
        product += integer(5, price_cents)
        paths.append("price_cents")
    return length_delimited(1, product) + length_delimited(2, field_mask(*paths))


GET_USER = "/readthrough.v1.UserService/GetUser"
BATCH_GET_USERS = "/readthrough.v1.UserService/BatchGetUsers"
UPDATE_USER = "/readthrough.v1.UserService/UpdateUser"
GET_PRODUCT = "/readthrough.v1.ProductService/GetProduct"
LIST_PRODUCTS = "/readthrough.v1.ProductService/ListProducts"
UPDATE_PRODUCT = "/readthrough.v1.ProductService/UpdateProduct"

# The phases of the traffic, each until that share of the run.
PHASES = [("quiet", 0.25), ("busy", 0.6), ("burst", 0.7), ("cool", 1.0)]


class Driver:
    def __init__(self, args):
        self.args = args
        self.grpc = args.grpc
        self.workdir = tempfile.mkdtemp(prefix="readthrough-dashboard-bodies-")
        self.start = time.monotonic()
        self.deadline = self.start + args.seconds
        self.lock = threading.Lock()
        self.calls = {}  # path -> requests h2load sent
        self.failures = []
        self.users = self.psql("SELECT id FROM users ORDER BY id")
        self.products = self.psql("SELECT id FROM products ORDER BY id")
        self.categories = self.psql("SELECT DISTINCT category_id FROM products ORDER BY 1")
        if not (self.users and self.products and self.categories):
            sys.exit("drive: the database has no demo data (run `readthrough seed` first)")
        # A few hot ids, read all the time; the rest are read at random, cold at first.
        self.hot_users = self.users[:16]
        self.hot_products = self.products[:16]

    # -- plumbing

    def psql(self, sql):
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", self.args.database_url, "-c", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        return [line for line in out.splitlines() if line]

    def elapsed(self):
        return time.monotonic() - self.start

    def phase(self):
        """quiet, busy, burst, cool: by the share of the run gone."""
        share = self.elapsed() / self.args.seconds
        return next((name for name, end in PHASES if share < end), PHASES[-1][0])

    def running(self):
        return time.monotonic() < self.deadline

    def body(self, message):
        framed = b"\x00" + len(message).to_bytes(4, "big") + message  # uncompressed, length-prefixed
        fd, path = tempfile.mkstemp(dir=self.workdir, suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(framed)
        return path

    def h2load(self, path, message, requests, clients=1, streams=1, rps=None):
        """One h2load run sending `message` to `path` `requests` times, at `rps` per client when given.

        Counted runs, not timed ones (-D): when its time is up h2load cancels
        the calls in flight, which the service would count as CANCELLED."""
        body = self.body(message)
        requests = max(requests, clients)
        command = ["h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams)]
        command += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", body]
        if rps:
            command += ["--rps", str(rps)]
        command.append(f"http://{self.grpc}{path}")
        seconds = requests / clients / rps if rps else 0
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
            sent = re.search(r"requests: \d+ total, \d+ started, (\d+) done", result.stdout)
            with self.lock:
                self.calls[path] = self.calls.get(path, 0) + (int(sent.group(1)) if sent else 0)
                if result.returncode != 0 or not sent:
                    self.failures.append(f"{path}: h2load exited {result.returncode}: {result.stdout[-300:]}{result.stderr[-300:]}")
        except subprocess.TimeoutExpired:
            with self.lock:
                self.failures.append(f"{path}: h2load did not finish")
        finally:
            os.unlink(body)

    def sleep(self, seconds):
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    # -- the workers, each until the deadline

    def hot(self, path, make):
        """A steady rate on hot ids, in slices of a few seconds so that the rate follows the phase."""
        rates = {"quiet": (1, 20), "busy": (3, 100), "burst": (2, 40), "cool": (1, 20)}
        while self.running():
            clients, rps = rates[self.phase()]
            seconds = min(4, self.deadline - time.monotonic())
            if seconds < 1:
                break
            self.h2load(path, make(), requests=int(clients * rps * seconds), clients=clients, rps=rps)

    def wide_reads(self):
        """Random users, products and list pages, each read once: cold at first, so the hit rate climbs."""
        pauses = {"quiet": 0.4, "busy": 0.1, "burst": 0.3, "cool": 0.4}
        rng = random.Random(11)
        while self.running():
            self.h2load(BATCH_GET_USERS, batch_get_users(rng.sample(self.users, 20)), requests=1)
            self.h2load(GET_PRODUCT, get_by_id(rng.choice(self.products)), requests=1)
            self.h2load(GET_USER, get_by_id(rng.choice(self.users)), requests=1)
            self.h2load(
                LIST_PRODUCTS, list_products(rng.choice(self.categories), rng.randrange(0, 20), 20), requests=1
            )
            self.sleep(pauses[self.phase()])

    def bad_requests(self):
        """Ids that do not exist (NOT_FOUND) and requests that are not valid (INVALID_ARGUMENT)."""
        pauses = {"quiet": 1.0, "busy": 0.4, "burst": 1.0, "cool": 1.0}
        rng = random.Random(13)
        turn = 0
        while self.running():
            self.h2load(GET_USER, get_by_id(str(uuid.UUID(int=rng.getrandbits(128), version=4))), requests=2)
            self.h2load(GET_PRODUCT, get_by_id(str(uuid.UUID(int=rng.getrandbits(128), version=4))), requests=1)
            if turn % 2 == 0:
                self.h2load(GET_USER, get_by_id("not-a-uuid"), requests=1)
            else:
                self.h2load(LIST_PRODUCTS, list_products(rng.choice(self.categories), 0, 500), requests=1)
            turn += 1
            self.sleep(pauses[self.phase()])

    def writes(self):
        """Users' preferences and products' prices and names, through the API, among the ids read most."""
        pauses = {"quiet": 1.0, "busy": 0.3, "burst": 0.3, "cool": 1.0}
        rng = random.Random(17)
        themes = ["dark", "light", "solarized", "contrast"]
        while self.running():
            user = rng.choice(self.hot_users if rng.random() < 0.5 else self.users)
            self.h2load(UPDATE_USER, update_user_preferences(user, rng.choice(themes)), requests=1)
            product = rng.choice(self.hot_products if rng.random() < 0.5 else self.products)
            if rng.random() < 0.8:
                self.h2load(UPDATE_PRODUCT, update_product(product, price_cents=rng.randrange(100, 100_000)), requests=1)
            else:
                self.h2load(UPDATE_PRODUCT, update_product(product, name=f"Renamed {rng.randrange(10_000)}"), requests=1)
            self.sleep(pauses[self.phase()])

    def burst(self):
        """In the burst phase: many writes through the API at once, on the hot ids."""
        while self.running() and self.phase() in ("quiet", "busy"):
            self.sleep(0.2)
        rng = random.Random(19)
        while self.running() and self.phase() == "burst":
            product = rng.choice(self.hot_products)
            self.h2load(
                UPDATE_PRODUCT,
                update_product(product, price_cents=rng.randrange(100, 100_000)),
                requests=200,
                clients=4,
                streams=4,
            )
            user = rng.choice(self.hot_users)
            self.h2load(UPDATE_USER, update_user_preferences(user, "burst"), requests=100, clients=2, streams=4)

    def bulk_sql(self):
        """Reprices in SQL, as another system or a migration writing to the tables would.

        The triggers record every row in the outbox and nobody invalidates
        right after the commit: the relay does (backlog, relay lag, relayed
        rows and the events they publish). A small one early, so the relay's
        counters exist before the large ones (a counter's first value is no
        increase to rate()), then every product at the start of the burst and
        half of the categories a little later."""
        burst = dict(PHASES)["busy"]  # where the burst starts
        plan = [(0.1, self.categories[:1]), (burst, self.categories), (burst + 0.05, self.categories[::2])]
        for at, categories in plan:
            self.sleep(self.start + at * self.args.seconds - time.monotonic())
            if not self.running():
                return
            names = ", ".join("'" + c.replace("'", "''") + "'" for c in categories)
            try:
                self.psql(f"UPDATE products SET price_cents = price_cents + 1 WHERE category_id IN ({names})")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                with self.lock:
                    self.failures.append(f"bulk reprice: {error} {getattr(error, 'stderr', '')}")

    def run(self):
        hot_users = self.hot_users
        hot_products = self.hot_products
        rng = random.Random(23)
        workers = [
            lambda: self.hot(GET_USER, lambda: get_by_id(rng.choice(hot_users))),
            lambda: self.hot(GET_PRODUCT, lambda: get_by_id(rng.choice(hot_products))),
            lambda: self.hot(BATCH_GET_USERS, lambda: batch_get_users(rng.sample(hot_users, 8))),
            lambda: self.hot(LIST_PRODUCTS, lambda: list_products(self.categories[0], 0, 20)),
            self.wide_reads,
            self.bad_requests,
            self.writes,
            self.burst,
            self.bulk_sql,
        ]
        threads = [threading.Thread(target=worker, daemon=True) for worker in workers]
        last_phase = None
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            phase = self.phase() if self.running() else "done"
            if phase != last_phase:
                print(f"  {self.elapsed():5.0f} s  {phase}", flush=True)
                last_phase = phase
            time.sleep(0.5)
        os.rmdir(self.workdir)
        total = sum(self.calls.values())
        print(f"  {total} calls sent: " + ", ".join(f"{p.rsplit('/', 1)[1]} {n}" for p, n in sorted(self.calls.items())))
        if self.failures:
            print(f"drive: {len(self.failures)} h2load runs failed, the first: {self.failures[0]}", file=sys.stderr)
            return 1
        return 0


# ---------------------------------------------------------------------------
# render: the panels
# ---------------------------------------------------------------------------

# Queries a healthy run returns no series for, with the reason. Each of these
# metrics is registered by the service on its first increment (or, for the
# replica lag, per configured replica), so Prometheus has no series of it
# until the event happens; nothing here is an error, so none is made up.
KNOWN_ABSENT = {
    "readthrough_cache_errors_total": "no Redis call failed",
    "readthrough_invalidation_failures_total": "Redis confirmed every one",
    "readthrough_db_fallbacks_shed_total": "nothing was shed",
    "readthrough_requests_shed_total": "nothing was shed",
    "readthrough_event_subscription_lost_total": "the subscription never dropped",
    "readthrough_db_replica_lag_seconds": "no replicas: DATABASE_READ_URLS unset",
}

# Grafana's "classic" palette.
PALETTE = [
    "#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9", "#705DA0",
    "#508642", "#CCA300", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477",
]
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
DIM = "#8e8e9e"


def prometheus_get(base, path, params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400/422: the query was rejected; the body says why
        try:
            return json.load(error)
        except ValueError:
            return {"status": "error", "error": f"HTTP {error.code}"}


def duration(seconds):
    seconds = max(1, int(round(seconds)))
    return f"{seconds // 60}m" if seconds % 60 == 0 and seconds >= 60 else f"{seconds}s"


def substitute(expr, variables):
    """Grafana's variables: the built-in ones, then any other ($x, ${x}, [[x]]) as a match-all regex."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    expr = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_:]*\}|\[\[[A-Za-z_][A-Za-z0-9_:]*\]\]|\$[A-Za-z_][A-Za-z0-9_]*", ".*", expr)
    return expr


def legend(fmt, labels):
    if not fmt or fmt == "__auto":
        name = labels.get("__name__", "")
        rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{name}{{{rest}}}" if rest or not name else name
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def metrics_in(expr):
    return [word for word in re.split(r"[^A-Za-z0-9_]", expr) if word.startswith("readthrough_")]


def si(value, suffix=""):
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{suffix}".rstrip()
    return f"{value:.3g} {suffix}".rstrip() if value else f"0 {suffix}".rstrip()


def seconds_text(value):
    if value == 0:
        return "0 s"
    magnitude = abs(value)
    if magnitude < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if magnitude < 1:
        return f"{value * 1e3:.3g} ms"
    if magnitude < 60:
        return f"{value:.3g} s"
    return f"{value / 60:.3g} min"


def formatter(unit):
    """A value in the panel's unit (fieldConfig.defaults.unit), as Grafana writes it."""
    units = {
        "percentunit": lambda v: f"{v * 100:.4g}%",
        "percent": lambda v: f"{v:.4g}%",
        "s": seconds_text,
        "ms": lambda v: seconds_text(v / 1e3),
        "µs": lambda v: seconds_text(v / 1e6),
        "reqps": lambda v: si(v, "req/s"),
        "ops": lambda v: si(v, "ops/s"),
        "bytes": lambda v: si(v, "B"),
    }
    return units.get(unit or "short", lambda v: si(v))


def render(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    with open(args.dashboard) as f:
        dashboard = json.load(f)
    start, end, step = args.start, args.end, args.step
    # Grafana: $__interval is the step; $__rate_interval = max($__interval + scrape interval, 4 × scrape interval).
    rate_interval = max(step + args.scrape_interval, 4 * args.scrape_interval)
    variables = {
        "__rate_interval": duration(rate_interval),
        "__interval": duration(step),
        "__interval_ms": str(int(step * 1000)),
        "__range": duration(end - start),
        "__range_s": str(int(end - start)),
        "__range_ms": str(int((end - start) * 1000)),
    }
    for variable in dashboard.get("templating", {}).get("list", []):
        variables.setdefault(variable["name"], ".*")
    info = prometheus_get(args.prometheus, "/api/v1/status/buildinfo", {})
    version = info.get("data", {}).get("version", "?").split("+")[0]

    panels = []
    errors, warnings = [], []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "")
        series = []
        absent = []
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            expr = substitute(target["expr"], variables)
            answer = prometheus_get(
                args.prometheus, "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step}
            )
            if answer.get("status") != "success":
                errors.append(f'panel "{title}", query {target.get("refId")}: Prometheus rejected it: '
                              f'{answer.get("error")}\n    {expr}')
                continue
            result = answer["data"]["result"]
            name = target.get("legendFormat", "")
            if not result:
                reasons = [KNOWN_ABSENT[m] for m in metrics_in(target["expr"]) if m in KNOWN_ABSENT]
                if reasons and len(reasons) == len(metrics_in(target["expr"])):
                    warnings.append(f'panel "{title}", query {target.get("refId")}: no series ({"; ".join(dict.fromkeys(reasons))})')
                    absent.append((name, "; ".join(dict.fromkeys(reasons))))
                else:
                    errors.append(f'panel "{title}", query {target.get("refId")}: no series\n    {expr}')
                continue
            found = []
            for item in result:
                times = [datetime.fromtimestamp(float(t)) for t, _ in item["values"]]
                values = [float(v) for _, v in item["values"]]  # "NaN" and "+Inf" parse too
                values = [v if math.isfinite(v) else math.nan for v in values]
                found.append((legend(name, item["metric"]), times, values))
            series += sorted(found, key=lambda s: s[0])
        if not series and not any(e.startswith(f'panel "{title}"') for e in errors):
            errors.append(f'panel "{title}": no query returned a series')
        panels.append((panel, series, absent))

    # The figure: Grafana's 24 columns; every row of gridPos.h units the same height.
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _, _ in panels)
    width_in, unit_in, caption_in, gap = 18.0, 0.34, 0.75, 0.05
    height_in = rows * unit_in + caption_in
    plt.rcParams.update({"font.size": 8, "font.family": "DejaVu Sans", "text.color": TEXT})
    figure = plt.figure(figsize=(width_in, height_in), dpi=args.dpi, facecolor=BACKGROUND)
    minutes = f"{round((end - start) / 30) / 2:g}"
    figure.text(
        0.01, 1 - 0.28 / height_in,
        f"readthrough dashboard — panels of deploy/grafana/dashboards/readthrough.json evaluated by "
        f"Prometheus {version} over a {minutes}-minute run of the release binary",
        fontsize=12, color=TEXT, va="center", weight="bold",
    )
    figure.text(
        0.99, 1 - 0.6 / height_in, "drawn by scripts/dashboard.py; not a Grafana screenshot",
        fontsize=10, color="#EAB839", va="center", ha="right", weight="bold",
    )
    figure.text(
        0.01, 1 - 0.6 / height_in,
        f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(end):%H:%M:%S}, "
        f"scraped every {args.scrape_interval:g} s, step {step:g} s, $__rate_interval = {variables['__rate_interval']}. "
        "Traffic (scripts/dashboard): quiet, busy, a write burst with a bulk SQL reprice, quiet again.",
        fontsize=8.5, color=DIM, va="center",
    )

    def box(x, y, w, h):
        """gridPos units to figure coordinates (left, bottom, width, height)."""
        left = x / 24
        top = 1 - (caption_in + y * unit_in) / height_in
        return left, top - h * unit_in / height_in, w / 24, h * unit_in / height_in

    for panel, series, absent in panels:
        grid = panel["gridPos"]
        left, bottom, width, height = box(grid["x"], grid["y"], grid["w"], grid["h"])
        pad_x, pad_y = gap / width_in, gap / height_in
        figure.patches.append(Rectangle(
            (left + pad_x, bottom + pad_y), width - 2 * pad_x, height - 2 * pad_y,
            transform=figure.transFigure, facecolor=PANEL, edgecolor=BORDER, linewidth=0.8, zorder=-10,
        ))
        title_y = bottom + height - pad_y - 0.2 / height_in
        figure.text(left + pad_x + 0.1 / width_in, title_y, panel.get("title", ""), fontsize=9.5,
                    color=TEXT, weight="bold", va="center")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        fmt = formatter(unit)
        kind = panel.get("type", "timeseries")
        inner_top = title_y - 0.2 / height_in
        inner_bottom = bottom + pad_y + 0.3 / height_in

        if kind in ("stat", "gauge", "singlestat"):
            for i, (name, _, values) in enumerate(series):
                last = next((v for v in reversed(values) if not math.isnan(v)), math.nan)
                cell = (width - 2 * pad_x) / max(1, len(series))
                x = left + pad_x + cell * (i + 0.5)
                figure.text(x, (inner_top + inner_bottom) / 2, fmt(last), fontsize=22, color=PALETTE[i % len(PALETTE)],
                            ha="center", va="center", weight="bold")
                figure.text(x, inner_bottom, name, fontsize=8, color=DIM, ha="center")
            continue

        legend_share = 0.42 if panel.get("options", {}).get("legend", {}).get("placement", "bottom") == "right" else 0.0
        plot_left = left + pad_x + 0.75 / width_in
        plot_width = (width - 2 * pad_x) * (1 - legend_share) - 0.85 / width_in
        axes = figure.add_axes((plot_left, inner_bottom, plot_width, inner_top - inner_bottom))
        axes.set_facecolor(PANEL)
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.grid(True, color=BORDER, linewidth=0.6)
        axes.tick_params(colors=DIM, labelsize=7, length=0)
        lines = []
        for i, (name, times, values) in enumerate(series):
            color = PALETTE[i % len(PALETTE)]
            axes.plot(times, values, color=color, linewidth=1.2)
            if unit != "percentunit":  # a fill down to 0 would stretch a ratio's axis to 0
                axes.fill_between(times, values, color=color, alpha=0.06, linewidth=0)
            last = next((v for v in reversed(values) if not math.isnan(v)), math.nan)
            lines.append((name, color, "" if math.isnan(last) else fmt(last)))
        axes.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        axes.xaxis.set_major_locator(MaxNLocator(6))
        axes.yaxis.set_major_locator(MaxNLocator(5))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, fmt=fmt: fmt(v)))
        if unit != "percentunit":  # counts and rates from 0; a ratio on the range it covers
            low, high = axes.get_ylim()
            axes.set_ylim(min(0, low), high)

        if legend_share:
            # Grafana's table legend on the right: name, and the last value (lastNotNull).
            x0 = left + width * (1 - legend_share) + 0.05 / width_in
            x1 = left + width - pad_x - 0.12 / width_in
            entries = len(lines) + len(absent)
            available = inner_top - inner_bottom + 0.2 / height_in
            line_height = min(0.16 / height_in, available / max(1, entries + 1))
            font = 7.2 if line_height >= 0.14 / height_in else 6.2
            y = inner_top + 0.05 / height_in
            figure.text(x1, y, "Last *", fontsize=font, color=DIM, ha="right", va="center", weight="bold")
            for name, color, last in lines:
                y -= line_height
                figure.patches.append(Rectangle((x0, y - 0.02 / height_in), 0.16 / width_in, 0.04 / height_in,
                                                transform=figure.transFigure, facecolor=color, edgecolor="none"))
                figure.text(x0 + 0.22 / width_in, y, shorten(name, 44), fontsize=font, color=TEXT, va="center")
                figure.text(x1, y, last, fontsize=font, color=TEXT, ha="right", va="center")
            for name, reason in absent:
                y -= line_height
                figure.text(x0 + 0.22 / width_in, y, shorten(f"{name or 'query'}: no series ({reason})", 76),
                            fontsize=font - 0.6, color=DIM, va="center", style="italic")

    figure.savefig(args.out, dpi=args.dpi, facecolor=BACKGROUND)
    print(f"  wrote {args.out} ({os.path.getsize(args.out) // 1024} KB), {len(panels)} panels, Prometheus {version}")
    for warning in warnings:
        print(f"  note: {warning}")
    if errors:
        print("dashboard queries that failed:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


def shorten(text, limit):
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    drive = commands.add_parser("drive", help="send the mixed traffic")
    drive.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC listener")
    drive.add_argument("--database-url", required=True, help="the service's database (ids, and the bulk SQL reprice)")
    drive.add_argument("--seconds", type=float, default=150)
    draw = commands.add_parser("render", help="evaluate the panels' queries and draw them")
    draw.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9091")
    draw.add_argument("--start", type=float, required=True, help="Unix time")
    draw.add_argument("--end", type=float, required=True, help="Unix time")
    draw.add_argument("--step", type=float, default=2)
    draw.add_argument("--scrape-interval", type=float, default=1)
    draw.add_argument("--dashboard", default=DASHBOARD)
    draw.add_argument("--out", default=os.path.join(ROOT, "docs", "dashboard.png"))
    draw.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    if args.command == "drive":
        return Driver(args).run()
    return render(args)


if __name__ == "__main__":
    sys.exit(main())
