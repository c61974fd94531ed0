"""A real nbdkit serving plugin.py on a Unix socket, for the end-to-end tests.

``NbdkitServer(directory, size="64M", **params)`` starts
``nbdkit -f -U SOCK --threads N python plugin.py size=... key=value...``
with the control socket and runtime directory inside ``directory``, waits
until the NBD socket accepts connections (``wait_control()`` waits for the
control socket too), and stops the server (SIGTERM, then SIGKILL) on
``stop()`` or at the end of a ``with`` block.  nbdkit's stderr goes to
``directory/nbdkit.log`` so a failing test can show it.

N worker threads per connection as zramd up and scripts/quickstart serve
(zramd.attach.server_threads(): one on nbdkit 1.32, which with more aborts
now and then when a client dies with requests in flight, docs/operations.md,
"Known limit: nbdkit 1.32 and dying clients"; more on later nbdkit).
``threads=N`` (or ``--threads`` in ``extra_args``) asks for another number,
``threads=None`` for nbdkit's default (16).

zramd's nbdkit filter in front of the plugin, as zramd up serves
(zramd.attach.server_filter()); ``filter=None`` for the plugin alone.
"""

import os
import signal
import socket
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "plugin.py")


class NbdkitServer:
    def __init__(self, directory, size="64M", name="zramd0", extra_args=(),
                 env=None, threads="as zramd up", filter="as zramd up",
                 **params):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.name = name
        self.socket = os.path.join(self.directory, name + ".nbd")
        self.control = os.path.join(self.directory, name + ".sock")
        self.log_path = os.path.join(self.directory, "nbdkit.log")
        self.uri = "nbd+unix:///?socket=" + self.socket
        if threads == "as zramd up":
            from zramd.attach import server_threads
            threads = server_threads()
        if threads is not None and not any(
                arg in ("-t", "--threads") or arg.startswith("--threads=")
                for arg in extra_args):
            extra_args = ("--threads", str(threads), *extra_args)
        if filter == "as zramd up":
            from zramd.attach import server_filter
            filter = server_filter()[0]
        if filter is not None:
            extra_args = (*extra_args, "--filter=" + filter)
        args = ["nbdkit", "-f", "-U", self.socket, *extra_args,
                "python", PLUGIN, "size=%s" % size, "name=%s" % name,
                "control=%s" % self.control]
        args += ["%s=%s" % (k, v) for k, v in params.items()]
        self.args = args
        run_env = dict(os.environ)
        run_env["ZRAMD_RUNTIME_DIR"] = self.directory
        if env:
            run_env.update(env)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=run_env)
        self._wait_ready()

    def _wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("nbdkit exited with %s:\n%s"
                                   % (self.process.returncode, self.log()))
            if os.path.exists(self.socket):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self.socket)
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nbdkit did not start:\n" + self.log())

    def wait_control(self, timeout=10.0):
        """Wait until the control socket (started in after_fork) exists."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.control):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("no control socket:\n" + self.log())
            time.sleep(0.05)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
