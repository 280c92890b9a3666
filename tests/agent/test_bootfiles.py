"""`python -I -m zfs_unlock_agent.bootfiles`: what the initramfs hooks copy.

The list must name the interpreter, pyvenv.cfg in a virtual environment, every module
file the unlock path imports, and with --config the configuration's files; it must
leave out the large libraries the unlock path does not need. The strongest check
builds a directory holding only the listed files (and the shared libraries `ldd`
names for each "exec" file), chroots into it as an initramfs would, and runs the
agent: `--version`, then a real `unlock --no-mount` against the real key server,
with a fake zfs that brings its own interpreter under /fakepy so that it cannot
supply anything the agent's list lacks.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import site
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import zfs_unlock_agent
import zfs_unlock_common
from bench.common import machine_id_for, plain_install
from tests.agent.harness import AgentHost
from tests.chroot import Image
from tests.fakes import FakeZfs, sha256
from tests.keyserver import KeyServer

ROOT = Path(__file__).parents[2]
FAKES = ROOT / "tests" / "fakes"
EX_SOFTWARE, EX_CONFIG = 70, 78
# The unlock path never imports these; copying them would only make the image larger.
NOT_ON_THE_UNLOCK_PATH = ("cryptography", "cffi", "_cffi_backend", "pyudev", "sdnotify")

# An editable install ('pip install -e', as in this checkout's .venv) finds the package
# through a meta-path finder that a .pth file in site-packages installs at start-up.
EDITABLE = not Path(zfs_unlock_agent.__file__).is_relative_to(Path(site.getsitepackages()[0]))


def run_bootfiles(
    *args: str, python: str = sys.executable, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = ["-m", "zfs_unlock_agent.bootfiles", *args] if code is None else ["-c", code]
    return subprocess.run(
        [python, "-I", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"]},
    )


def parse(stdout: str) -> list[tuple[str, Path]]:
    lines = []
    for line in stdout.splitlines():
        kind, path = line.split(" ", 1)
        lines.append((kind, Path(path)))
    return lines


@pytest.fixture(scope="module")
def listed() -> list[tuple[str, Path]]:
    result = run_bootfiles()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return parse(result.stdout)


def unlock_path_modules() -> set[Path]:
    """The module files a fresh, isolated interpreter has loaded after importing the CLI."""
    code = (
        "import sys, zfs_unlock_agent.cli\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return {Path(line) for line in result.stdout.splitlines()}


# The list


def test_the_interpreter_first_then_pyvenv_cfg(listed: list[tuple[str, Path]]) -> None:
    assert listed[0] == ("exec", Path(sys.executable))
    assert sys.prefix != sys.base_prefix  # the premise: the suite runs in a venv
    assert listed[1] == ("file", Path(sys.prefix) / "pyvenv.cfg")


def test_outside_a_venv_there_is_no_pyvenv_cfg() -> None:
    """The base interpreter, given the venv's packages on sys.path by hand."""
    paths = [str(ROOT), *site.getsitepackages()]
    code = (
        f"import sys; sys.path[:0] = {paths!r}\n"
        "from zfs_unlock_agent import bootfiles; raise SystemExit(bootfiles.main([]))"
    )
    base = getattr(sys, "_base_executable", sys.executable)
    result = run_bootfiles(python=base, code=code)

    assert result.returncode == 0, result.stderr
    lines = parse(result.stdout)
    assert lines[0] == ("exec", Path(base))
    assert not any(path.name == "pyvenv.cfg" for _, path in lines)


def test_every_line_is_a_kind_and_an_existing_absolute_path(
    listed: list[tuple[str, Path]],
) -> None:
    paths = [path for _, path in listed]
    assert len(paths) == len(set(paths))
    for kind, path in listed:
        assert kind in ("exec", "file"), (kind, path)  # "private" only with --config
        assert path.is_absolute() and path.is_file(), path
        assert (kind == "exec") == (path.suffix == ".so" or path == Path(sys.executable))


def test_every_module_the_unlock_path_imports_is_listed(listed: list[tuple[str, Path]]) -> None:
    paths = {path for _, path in listed}
    imported = unlock_path_modules()

    assert imported, "the fresh interpreter loaded nothing?"
    assert imported - paths == set()
    for path in imported & paths:
        cached = Path(importlib.util.cache_from_source(str(path)))
        if path.suffix == ".py" and cached.is_file():
            assert cached in paths, f"{path}'s bytecode"
    package = Path(zfs_unlock_agent.__file__).parent
    for name in ("__main__.py", "cli.py", "keyclient.py", "unlock.py", "zfs.py"):
        assert package / name in paths
    common = Path(zfs_unlock_common.__file__).parent
    for name in ("pinning.py", "protocol.py", "validate.py"):
        assert common / name in paths
    assert Path(os.__file__) in paths  # the interpreter's landmark for its standard library


def test_the_large_libraries_are_not_listed(listed: list[tuple[str, Path]]) -> None:
    for _, path in listed:
        parts = set(path.parts) | {path.name.split(".")[0]}
        assert not parts & set(NOT_ON_THE_UNLOCK_PATH), path
        assert "zfs_unlock_server" not in str(path) and "gunicorn" not in str(path), path
    package = Path(zfs_unlock_agent.__file__).parent
    for name in ("daemon.py", "notify.py"):  # the daemon's modules
        assert ("file", package / name) not in listed
    assert ("file", Path(zfs_unlock_common.__file__).parent / "csr.py") not in listed  # X.509


# With --config


def host_files(tmp_path: Path, key_mode: int = 0o400, relative: bool = True) -> Path:
    """A configuration whose files are checked but never used: no server needed."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "client.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    key = etc / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(key_mode)
    (etc / "machine-id").write_text(machine_id_for("bootfiles") + "\n")
    where = "" if relative else f"{etc}/"
    config = etc / "agent.toml"
    config.write_text(
        f'machine_id_file = "{where}machine-id"\n'
        '[[server]]\nurl = "https://127.0.0.1:9"\n'
        'pins = ["sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]\n'
        f'[client]\ncertificate = "{where}client.crt"\nkey = "{where}client.key"\n'
    )
    return config


@pytest.mark.parametrize("relative", [True, False], ids=["relative-paths", "absolute-paths"])
def test_config_adds_its_files_first_the_key_as_private(tmp_path: Path, relative: bool) -> None:
    config = host_files(tmp_path, relative=relative)

    result = run_bootfiles("--config", str(config))

    assert result.returncode == 0, result.stderr
    lines = parse(result.stdout)
    etc = tmp_path / "etc"
    assert lines[:4] == [
        ("file", config),
        ("file", etc / "client.crt"),
        ("private", etc / "client.key"),
        ("file", etc / "machine-id"),
    ]
    assert lines[4] == ("exec", Path(sys.executable))
    assert [kind for kind, _ in lines].count("private") == 1


def test_the_learned_server_pins_are_listed_when_there_are_some(tmp_path: Path) -> None:
    """The pins the daemon learned during a rollover of the server's TLS key go into the
    image, so that the boot after the switch trusts the new key."""
    config = host_files(tmp_path)
    config.write_text(f'state_directory = "{tmp_path}/state"\n' + config.read_text())
    assert ("file", tmp_path / "state" / "pins.json") not in parse(
        run_bootfiles("--config", str(config)).stdout
    )
    (tmp_path / "state").mkdir()
    pin = "sha256//" + base64.b64encode(bytes(32)).decode()
    (tmp_path / "state" / "pins.json").write_text(f'{{"format": 1, "pins": {{"{pin}": 1}}}}\n')

    result = run_bootfiles("--config", str(config))

    assert result.returncode == 0, result.stderr
    assert ("file", tmp_path / "state" / "pins.json") in parse(result.stdout)


@pytest.mark.parametrize("mode", [0o440, 0o404, 0o600 | 0o040])
def test_a_client_key_others_may_read_exits_78_with_nothing_listed(
    tmp_path: Path, mode: int
) -> None:
    config = host_files(tmp_path, key_mode=mode)

    result = run_bootfiles("--config", str(config))

    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert "client.key" in result.stderr


def test_an_unusable_machine_id_exits_78_with_nothing_listed(tmp_path: Path) -> None:
    config = host_files(tmp_path)
    (tmp_path / "etc" / "machine-id").write_text("not a machine-id\n")

    result = run_bootfiles("--config", str(config))

    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    assert "machine-id" in result.stderr


def test_a_path_with_a_newline_is_refused(tmp_path: Path) -> None:
    """The hooks read one path per line: a newline would smuggle in a line of its own."""
    config = host_files(tmp_path)
    odd = tmp_path / "etc" / "client\nexec x.crt"
    (tmp_path / "etc" / "client.crt").rename(odd)
    config.write_text(config.read_text().replace("client.crt", "client\\nexec x.crt"))

    result = run_bootfiles("--config", str(config))

    assert result.returncode == EX_SOFTWARE
    assert result.stdout == ""


# The strongest check: an image of only the listed files


def add_fake_zfs(image: Image, fake: FakeZfs) -> None:
    """zfs and zpool in the image, run by a second interpreter under /fakepy with only the
    standard library modules fake_zfs.py imports. It may use no shared library that the
    agent's list did not already bring: then it cannot hide a gap in that list."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    prefix = Path(sys.base_prefix)
    code = (
        f"import sys; sys.path.insert(0, {str(FAKES)!r}); import fake_zfs\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    result = subprocess.run(
        [str(base), "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    fakepy = Path("/fakepy")
    agent_libraries = set(image.libraries)
    image.add_exec(base, at=fakepy / "bin" / base.name)
    for line in result.stdout.splitlines():
        path = Path(line)
        if path.is_relative_to(prefix):
            at = fakepy / path.relative_to(prefix)
            if path.suffix == ".so":
                image.add_exec(path, at=at)
            else:
                image.add(path, at=at)
    image.add(
        Path(os.__file__).resolve(), at=fakepy / Path(os.__file__).resolve().relative_to(prefix)
    )
    image.add(FAKES / "fake_zfs.py", at=fakepy / "fakes" / "fake_zfs.py")
    assert image.libraries == agent_libraries, (
        "the fake zfs needs shared libraries the agent's list does not bring:"
        f" {sorted(image.libraries - agent_libraries)}"
    )
    inside = Path("/") / fake.state_path.parent.relative_to(image.root)
    for program in ("zfs", "zpool"):
        wrapper = fake.bin_dir / program
        wrapper.write_text(
            f"#!{fakepy / 'bin' / base.name} -I\n"
            f"import sys\nsys.path.insert(0, '{fakepy / 'fakes'}')\nimport fake_zfs\n"
            f"sys.exit(fake_zfs.main(['fake_zfs', '--state', '{inside / fake.state_path.name}',"
            f" '--log', '{inside / fake.log_path.name}', '{program}', *sys.argv[1:]]))\n"
        )
        wrapper.chmod(0o755)


def image_of_listed_files(
    tmp_path: Path, python: Path, config: Path | None = None, extra: Sequence[Path] = ()
) -> Image:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    args = ("--config", str(config)) if config else ()
    result = run_bootfiles(*args, python=str(python))
    assert result.returncode == 0, result.stderr
    image = Image(tmp_path / "image")
    image.add_listed(parse(result.stdout))
    for path in extra:
        image.add(path)
    image.add_devices()
    return image


def agent_in(image: Image, python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """As the hooks' /usr/sbin/zfs-unlock-agent wrapper runs it."""
    return image.run(str(python), "-I", "-m", "zfs_unlock_agent", *args)


DEPENDENCIES = (
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset_normalizer",
    "pyudev",
    "sdnotify",
)


@pytest.fixture(scope="module")
def copied_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the agent and its dependencies copied into site-packages,
    as a regular (not editable) 'pip install' leaves them; returns its interpreter."""
    modules = [Path(p.__file__ or "").parent for p in (zfs_unlock_agent, zfs_unlock_common)]
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        modules.append(origin.parent if origin.name == "__init__.py" else origin)
    return plain_install(tmp_path_factory.mktemp("installed") / "venv", modules)


INSTALLS = [
    pytest.param("this-venv", id="this-venv"),
    pytest.param("copied-install", id="copied-install"),
]


def interpreter(install: str, request: pytest.FixtureRequest) -> Path:
    if install == "this-venv":
        return Path(sys.executable)
    python: Path = request.getfixturevalue("copied_install")
    return python


@pytest.mark.parametrize("install", INSTALLS)
def test_the_listed_files_alone_run_the_agent_in_a_chroot(
    tmp_path: Path, request: pytest.FixtureRequest, install: str
) -> None:
    python = interpreter(install, request)
    image = image_of_listed_files(tmp_path, python)

    result = agent_in(image, python, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"zfs-unlock-agent {zfs_unlock_agent.__version__}"


def unlock_in_a_chroot(
    server: KeyServer,
    tmp_path: Path,
    python: Path,
    name: str,
    extra: Sequence[Path] = (),
    server_name: str | None = None,
) -> tuple[subprocess.CompletedProcess[str], AgentHost, bytes]:
    """SERVER_NAME: reach the server by that name, which the image's /etc/hosts maps to
    127.0.0.1 (what DNS, set up by the provider from DHCP, does in an initramfs)."""
    host = AgentHost.create(tmp_path / "host", server, name)
    host.zfs = FakeZfs(tmp_path / "image" / "fake")
    pool = host.zfs.add_pool("rpool")
    key = host.encrypted_dataset("rpool/ROOT", pool)
    host.zfs.add_child("rpool/ROOT/debian")
    inside = Path("/fake/bin")
    urls = [f"https://{server_name}:{server.port}"] if server_name else None
    host.write_config(
        urls=urls, zfs_settings={"zfs": str(inside / "zfs"), "zpool": str(inside / "zpool")}
    )

    image = image_of_listed_files(tmp_path, python, host.config_path, extra)
    add_fake_zfs(image, host.zfs)
    if server_name:
        image.add_text("/etc/hosts", f"127.0.0.1 {server_name}\n")
        image.add_text("/etc/nsswitch.conf", "hosts: files\n")
    # What the initramfs-tools provider runs, with the configuration named explicitly.
    result = agent_in(
        image,
        python,
        "-c",
        str(host.config_path),
        "unlock",
        "--no-mount",
        "--deadline",
        "20",
        "--dataset",
        "rpool/ROOT",
    )
    return result, host, key


def assert_unlocked_without_mounting(host: AgentHost, key: bytes) -> None:
    assert host.zfs.keystatus("rpool/ROOT") == "available"
    assert not host.zfs.dataset("rpool/ROOT")["mounted"]
    assert host.zfs.calls("zfs", "mount") == []
    (load,) = host.zfs.calls("zfs", "load-key")
    assert load["argv"] == ["load-key", "-L", "prompt", "rpool/ROOT"]
    assert load["stdin_sha256"] == sha256(key)


@pytest.mark.parametrize("server_name", [None, "keys.zua.test"], ids=["address", "name"])
@pytest.mark.parametrize("install", INSTALLS)
def test_the_listed_files_alone_unlock_in_a_chroot(
    shared_keyserver: KeyServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    install: str,
    server_name: str | None,
) -> None:
    python = interpreter(install, request)
    result, host, key = unlock_in_a_chroot(
        shared_keyserver,
        tmp_path,
        python,
        f"chroot-{install}-{bool(server_name)}",
        server_name=server_name,
    )

    assert result.returncode == 0, result.stderr
    assert_unlocked_without_mounting(host, key)


@pytest.mark.skipif(not EDITABLE, reason="only an editable install relies on a .pth file")
def test_an_editable_install_lists_its_pth_file(listed: list[tuple[str, Path]]) -> None:
    """The .pth that installs an editable install's import hook runs at start-up."""
    assert any(p.name.startswith("__editable__") and p.suffix == ".pth" for _, p in listed)
