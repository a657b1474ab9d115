"""`robot-rl launch <file> [name:=value ...]`: runs a ROS 2 launch file (XML or YAML frontend) where
ROS 2's launch system is not installed. The same files stay valid for `ros2 launch`.

Supported subset (anything else is refused with one clear line):
  arg(name, default, description) · let(name, value) · set_env(name, value)
  include(file) with arg(name, value) children: another launch file's processes, with its arguments
  node(pkg, exec, name, namespace, output, on_exit, respawn, respawn_delay, args) with children
      param(name, value | from) · remap(from, to) · env(name, value)
  executable(cmd, name, cwd, output, on_exit) with env children
  group(scoped) holding actions · push_ros_namespace(namespace) · set_remap(from, to): several cells
      from one file, each in its namespace (tags may be spelled with '-' or '_')
  substitutions: $(var NAME) · $(env NAME [DEFAULT]) · $(find-pkg-share PKG) · $(dirname)
`pkg`/`exec` resolve through the `robot_rl.nodes` entry points (robot_rl) or the ament index
(lib/<pkg>/<exec> under AMENT_PREFIX_PATH). A node with `on_exit: shutdown` is required: when it
exits, everything stops and the launcher says which node and why. A node with `respawn: true` is
restarted `respawn_delay` seconds after it exits — unless it exits with status 2, a configuration
error a restart would only repeat: then the launch stops as for a required node. SIGINT/SIGTERM are
forwarded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import yaml

ACTIONS = {"arg", "let", "set_env", "node", "executable", "include", "group", "push_ros_namespace", "set_remap"}
SCHEMA: dict[str, tuple[set[str], set[str]]] = {  # tag -> (attributes, child tags)
    "launch": (set(), ACTIONS),
    "group": ({"scoped"}, ACTIONS),
    "push_ros_namespace": ({"namespace"}, set()),
    "set_remap": ({"from", "to"}, set()),
    "include": ({"file"}, {"arg"}),
    "arg": ({"name", "default", "description", "value"}, set()),
    "let": ({"name", "value"}, set()),
    "set_env": ({"name", "value"}, set()),
    "node": ({"pkg", "exec", "name", "namespace", "output", "on_exit", "respawn", "respawn_delay", "args"},
             {"param", "remap", "env"}),
    "executable": ({"cmd", "name", "cwd", "output", "on_exit"}, {"env"}),
    "param": ({"name", "value", "from"}, set()),
    "remap": ({"from", "to"}, set()),
    "env": ({"name", "value"}, set()),
}
REQUIRED_ATTRS = {"include": {"file"}, "arg": {"name"}, "let": {"name", "value"}, "set_env": {"name", "value"},
                  "node": {"pkg", "exec"}, "push_ros_namespace": {"namespace"}, "set_remap": {"from", "to"},
                  "executable": {"cmd"}, "remap": {"from", "to"}, "env": {"name", "value"}}
ENTRY_POINT_GROUP = "robot_rl.nodes"
_SUBST = re.compile(r"\$\(([a-z-]+)((?:\s+[^)\s]+)*)\s*\)")


class LaunchError(ValueError):
    """One line: the file, the element, what is wrong and what to do."""


@dataclass
class Entity:
    tag: str
    attrs: dict[str, str]
    children: list[Entity] = field(default_factory=list)


# ---- parsing ------------------------------------------------------------------------------------
def _yaml_actions(items, src: str, where: str) -> list[Entity]:
    """A list of one-key mappings (`- node: {...}`): the actions under `launch` or a group's `children`."""
    out = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            raise LaunchError(f"{src}: each action under '{where}' is a one-key mapping, got {item!r}")
        (tag, body), = item.items()
        out.append(_yaml_entity(tag, body, src))
    return out


def _yaml_entity(tag: str, body, src: str) -> Entity:
    tag = tag.replace("-", "_")
    if body is None:
        body = {}
    if isinstance(body, list) and tag == "group":  # `- group: [actions]`
        body = {"children": body}
    if not isinstance(body, dict):
        raise LaunchError(f"{src}: '{tag}' must be a mapping of attributes")
    attrs, children = {}, []
    for k, v in body.items():
        if k == "children" and isinstance(v, list):
            children += _yaml_actions(v, src, f"{tag}/children")
        elif isinstance(v, list):
            children += [_yaml_entity(k, item, src) for item in v]
        else:
            attrs[k] = "true" if v is True else "false" if v is False else str(v)
    return Entity(tag, attrs, children)


def parse(path: Path) -> Entity:
    src = str(path)
    try:
        if path.suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(path.read_text())
            if not isinstance(doc, dict) or set(doc) != {"launch"} or not isinstance(doc["launch"], list):
                raise LaunchError(f"{src}: a YAML launch file is one key 'launch' holding a list of actions")
            root = Entity("launch", {}, _yaml_actions(doc["launch"], src, "launch"))
        elif path.suffix == ".xml":
            def conv(e: ET.Element) -> Entity:
                return Entity(e.tag.replace("-", "_"), dict(e.attrib), [conv(c) for c in e])
            root = conv(ET.parse(path).getroot())
        else:
            raise LaunchError(f"{src}: launch files are .xml or .yaml")
    except (yaml.YAMLError, ET.ParseError) as e:
        raise LaunchError(f"{src}: cannot parse ({str(e).splitlines()[0]})") from None
    validate(root, src)
    return root


def validate(e: Entity, src: str, parent: str = "") -> None:
    """Check every tag and attribute against the supported subset (the schema above)."""
    where = f"{parent}/{e.tag}" if parent else e.tag
    if e.tag not in SCHEMA:
        raise LaunchError(f"{src}: <{e.tag}> (at {where}) is not supported by robot-rl launch; "
                          f"supported: {sorted(SCHEMA)}")
    attrs, kids = SCHEMA[e.tag]
    if e.tag == "launch" and parent:
        raise LaunchError(f"{src}: nested <launch> at {where}")
    for a in e.attrs:
        if a not in attrs:
            raise LaunchError(f"{src}: <{e.tag}> at {where} has unsupported attribute '{a}'; allowed: {sorted(attrs)}")
    missing = REQUIRED_ATTRS.get(e.tag, set()) - set(e.attrs)
    if missing:
        raise LaunchError(f"{src}: <{e.tag}> at {where} is missing {sorted(missing)}")
    if e.tag == "arg" and parent.endswith("include") and "value" not in e.attrs:
        raise LaunchError(f"{src}: <arg> inside <include> at {where} needs a value")
    if e.tag == "param" and ("value" in e.attrs) == ("from" in e.attrs):
        raise LaunchError(f"{src}: <param> at {where} needs exactly one of 'name'+'value' or 'from'")
    if e.tag == "param" and "value" in e.attrs and "name" not in e.attrs:
        raise LaunchError(f"{src}: <param> at {where} has a value but no name")
    if e.attrs.get("on_exit", "shutdown") != "shutdown":
        raise LaunchError(f"{src}: on_exit='{e.attrs['on_exit']}' at {where}; only 'shutdown' is supported")
    for c in e.children:
        if c.tag in SCHEMA and c.tag not in kids:
            raise LaunchError(f"{src}: <{c.tag}> is not allowed inside <{e.tag}> (at {where}); allowed: {sorted(kids)}")
        validate(c, src, where)


# ---- substitutions ------------------------------------------------------------------------------
def package_share(pkg: str) -> Path:
    if pkg == "robot_rl":
        return Path(str(resources.files("robot_rl.launch"))).parent
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / pkg).exists():
            return Path(prefix) / "share" / pkg
    raise LaunchError(f"package '{pkg}' not found (robot_rl, or an ament package on AMENT_PREFIX_PATH)")


def substitute(text: str, variables: dict[str, str], src: str) -> str:
    def one(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split()
        if kind == "var":
            if len(args) != 1 or args[0] not in variables:
                raise LaunchError(f"{src}: $(var {' '.join(args)}) is not a declared argument ({sorted(variables)})")
            return variables[args[0]]
        if kind == "env":
            if not args or len(args) > 2:
                raise LaunchError(f"{src}: $(env NAME [DEFAULT]) takes one or two words")
            if args[0] not in os.environ and len(args) == 1:
                raise LaunchError(f"{src}: environment variable {args[0]} is not set and has no default")
            return os.environ.get(args[0], args[1] if len(args) == 2 else "")
        if kind == "find-pkg-share":
            return str(package_share(args[0]))
        if kind == "dirname" and not args:
            return str(Path(src).resolve().parent)
        raise LaunchError(f"{src}: substitution $({kind} ...) is not supported (var, env, find-pkg-share, dirname)")
    return _SUBST.sub(one, text)


# ---- processes ----------------------------------------------------------------------------------
@dataclass
class Process:
    name: str
    cmd: list[str]
    env: dict[str, str]
    required: bool
    output: str = "screen"
    cwd: str | None = None
    respawn: float | None = None  # restart delay (s) of a respawning node
    proc: subprocess.Popen | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=5))


def resolve_exec(pkg: str, exe: str, src: str) -> list[str]:
    if pkg == "robot_rl":
        eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if exe not in eps:
            raise LaunchError(f"{src}: robot_rl has no node '{exe}' (nodes: {sorted(eps)})")
        return [sys.executable, "-m", eps[exe].module]
    path = package_share(pkg).parent.parent / "lib" / pkg / exe
    if not os.access(path, os.X_OK):
        raise LaunchError(f"{src}: executable '{exe}' not found in package '{pkg}' ({path})")
    return [str(path)]


@dataclass
class Scope:
    """What actions see: launch arguments, environment, the pushed namespace and global remaps. A
    scoped group works on a copy, so what it sets ends with it."""
    variables: dict[str, str]
    env: dict[str, str]
    ns: str = ""
    remaps: list[tuple[str, str]] = field(default_factory=list)

    def copy(self, variables: dict[str, str] | None = None) -> Scope:
        return Scope(dict(self.variables if variables is None else variables), dict(self.env), self.ns, list(self.remaps))


def _join_ns(outer: str, inner: str) -> str:
    inner = inner.strip()
    if inner.startswith("/"):
        return inner.rstrip("/") or "/"
    return "/" + "/".join(p for p in (outer.strip("/"), inner.strip("/")) if p)


def plan(path: Path, cli_args: dict[str, str], base_env: dict[str, str] | None = None,
         scope: Scope | None = None) -> list[Process]:
    """Resolve a launch file into the processes to start, in order."""
    src = str(path)
    root = parse(path)
    declared = [c.attrs["name"] for c in root.children if c.tag == "arg"]
    unknown = set(cli_args) - set(declared)
    if unknown:
        raise LaunchError(f"{src}: unknown launch argument(s) {sorted(unknown)}; arguments: {declared}")
    if scope is None:
        scope = Scope({}, dict(os.environ if base_env is None else base_env))
    return _actions(root.children, src, cli_args, scope)


def _actions(children: list[Entity], src: str, cli_args: dict[str, str], scope: Scope) -> list[Process]:
    variables, procs = scope.variables, []
    for e in children:
        if e.tag == "group":  # its children are substituted as they come (after its own push / let)
            inner = scope.copy() if e.attrs.get("scoped", "true") != "false" else scope
            procs += _actions(e.children, src, cli_args, inner)
            continue
        a = {k: substitute(v, variables, src) for k, v in e.attrs.items()}
        if e.tag == "arg":
            if a["name"] in cli_args:
                variables[a["name"]] = cli_args[a["name"]]
            elif "default" in a:
                variables[a["name"]] = a["default"]
            else:
                raise LaunchError(f"{src}: launch argument '{a['name']}' is required ({a.get('description', '')}); "
                                  f"pass {a['name']}:=<value>")
        elif e.tag == "let":
            variables[a["name"]] = a["value"]
        elif e.tag == "set_env":
            scope.env[a["name"]] = a["value"]
        elif e.tag == "push_ros_namespace":
            scope.ns = _join_ns(scope.ns, a["namespace"])
        elif e.tag == "set_remap":
            scope.remaps.append((a["from"], a["to"]))
        elif e.tag == "include":
            inner = {c.attrs["name"]: substitute(c.attrs["value"], variables, src) for c in e.children}
            # relative to the working directory, as in ros2 launch; the namespace and remaps carry in
            procs += plan(Path(a["file"]), inner, scope=scope.copy(variables={}))
        else:
            penv = dict(scope.env)
            for c in e.children:
                if c.tag == "env":
                    penv[c.attrs["name"]] = substitute(c.attrs["value"], variables, src)
            if e.tag == "executable":
                cmd = shlex.split(a["cmd"])
                name = a.get("name", Path(cmd[0]).name)
            else:
                cmd = resolve_exec(a["pkg"], a["exec"], src) + shlex.split(a.get("args", ""))
                name = a.get("name", a["exec"])
                ns = _join_ns(scope.ns, a["namespace"]) if "namespace" in a else scope.ns
                cmd += _ros_args(e, a, ns, scope.remaps, variables, src)
                if ns.strip("/"):
                    name = f"{ns.strip('/')}/{name}"  # unique among the launched processes
            respawn = None
            if a.get("respawn", "false") == "true":
                try:
                    respawn = float(a.get("respawn_delay", "0"))
                except ValueError:
                    raise LaunchError(f"{src}: respawn_delay '{a['respawn_delay']}' of node '{name}' is not a number") from None
            procs.append(Process(name, cmd, penv, a.get("on_exit") == "shutdown", a.get("output", "screen"),
                                 a.get("cwd"), respawn))
    return procs


def _ros_args(e: Entity, a: dict[str, str], ns: str, remaps: list[tuple[str, str]], variables: dict[str, str],
              src: str) -> list[str]:
    out = ["--ros-args"]
    if "name" in a:
        out += ["-r", f"__node:={a['name']}"]
    if ns.strip("/"):
        out += ["-r", f"__ns:={ns}"]
    for frm, to in remaps:  # set_remap's, before the node's own (as launch_ros orders them)
        out += ["-r", f"{frm}:={to}"]
    for c in e.children:
        ca = {k: substitute(v, variables, src) for k, v in c.attrs.items()}
        if c.tag == "remap":
            out += ["-r", f"{ca['from']}:={ca['to']}"]
        elif c.tag == "param" and "from" in ca:
            out += ["--params-file", ca["from"]]
        elif c.tag == "param":
            value = ca["value"] if ca["value"] != "" else "''"  # rcl reads values as YAML: '' is the empty string
            out += ["-p", f"{ca['name']}:={value}"]
    return out


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed launcher or `robot-rl run` never leaves a graph running."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Launcher:
    """Starts the planned processes, streams their output with a name prefix, forwards signals, and
    stops everything when a required process exits."""

    def __init__(self, procs: list[Process], grace: float = 5.0):
        self.procs, self.grace = procs, grace
        self.stopping = threading.Event()
        self.reason = ""
        self.reported = False

    def _pump(self, p: Process) -> None:
        for line in iter(p.proc.stdout.readline, ""):
            line = line.rstrip("\n")
            if line:
                p.tail.append(line)
                if p.output != "log":
                    print(f"[{p.name}] {line}", flush=True)

    def _start(self, p: Process) -> None:
        p.proc = subprocess.Popen(p.cmd, env=p.env, cwd=p.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, start_new_session=True, preexec_fn=die_with_parent)
        threading.Thread(target=self._pump, args=(p,), daemon=True).start()
        print(f"[launch] started {p.name} (pid {p.proc.pid})", flush=True)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            for p in self.procs:
                self._start(p)
            exited: dict[str, float] = {}  # respawning nodes waiting for their restart
            while not self.stopping.wait(0.1):
                for p in self.procs:
                    rc = p.proc.poll()
                    if rc is None or self.stopping.is_set():
                        continue
                    if p.respawn is not None and rc != 2:
                        if p.name not in exited:
                            exited[p.name] = time.monotonic()
                            print(f"[launch] {p.name} exited with status {rc}; respawning in {p.respawn:g} s", flush=True)
                        elif time.monotonic() - exited[p.name] >= p.respawn:
                            del exited[p.name]
                            self._start(p)
                    elif p.required or p.respawn is not None:
                        time.sleep(0.2)  # let the output pump catch the last lines
                        why = p.tail[-1] if p.tail else "no output"
                        self.reason = f"required node '{p.name}' exited with status {rc}: {why}"
                        self.stopping.set()
            return self.shutdown()
        finally:
            self.shutdown()

    def shutdown(self) -> int:
        live = [p for p in self.procs if p.proc is not None and p.proc.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + self.grace
        for p in live:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"[launch] {p.name} did not stop within {self.grace:.0f} s; killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()
        if self.reason and not self.reported:
            print(f"[launch] shutting down: {self.reason}", file=sys.stderr, flush=True)
            self.reported = True
        return 1 if self.reason else 0


def launch_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = resources.files("robot_rl.launch")
    for suffix in (".launch.yaml", ".launch.xml", ""):
        cand = shipped / f"{name_or_path}{suffix}"
        if cand.is_file():
            return Path(str(cand))
    names = sorted(f.name for f in shipped.iterdir() if f.name.endswith((".yaml", ".xml")))
    raise LaunchError(f"launch file '{name_or_path}' not found (a path, or one of {names})")


def main(argv: list[str]) -> int:
    if not argv:
        raise LaunchError("usage: robot-rl launch <file> [name:=value ...]")
    cli_args = {}
    for a in argv[1:]:
        if ":=" not in a:
            raise LaunchError(f"launch argument '{a}' is not name:=value")
        k, v = a.split(":=", 1)
        cli_args[k] = v
    return Launcher(plan(launch_path(argv[0]), cli_args)).run()
