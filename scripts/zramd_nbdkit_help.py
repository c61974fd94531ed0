"""Make ``nbdkit python ./plugin.py --help`` list zramd's keys.

nbdkit 1.32 answers ``--help`` before it reads the plugin's arguments
(server/main.c: load the plugin .so, then ``usage()`` and each backend's
``usage()``, then ``backend->free()`` and exit), so the python plugin never
runs the script and prints only its own static help ("script=<FILENAME>
(required) ...").  But loading the python plugin has already started the
embedded interpreter (``Py_Initialize`` in its load callback), and freeing
it ends the interpreter (``Py_Finalize``)::

    nbdkit python ./plugin.py --help
      dlopen nbdkit-python-plugin.so
        Py_Initialize -> site -> zramd_nbdkit_help.pth -> import this module
                                 (is this nbdkit --help about zramd's
                                 plugin.py?  then register print_help)
      print nbdkit's usage and the python plugin's
      backend->free -> Py_Finalize -> atexit -> print_help:
                                 plugin.py's config_help, after nbdkit's

``scripts/common.sh`` (install_help_hook) copies this file and the one-line
``zramd_nbdkit_help.pth`` into the site directory that nbdkit's interpreter
reads, which depends on the first python3 on PATH.  The .pth line imports
this module only in an embedded interpreter (``sys.orig_argv`` is empty
there, never in a ``python3`` command), so other Python programs pay for
reading one short .pth file and nothing else; in an embedded interpreter
that is not nbdkit asking for help, the cost is one readlink.  Nothing
here may raise: every step is guarded, and the import is stdlib only.

The text printed is the script's own ``config_help`` (plugin.py builds it
from ``zramd.params.PARAMETERS``), found by running the script as nbdkit
would, in a namespace of its own; only a ``plugin.py`` beside a ``zramd``
package with ``params.py`` (a zramd source tree) is run.
"""

import os
import sys

# getopt_long takes any unambiguous prefix of a long option, and nbdkit 1.32
# has no other long option beginning with "h" (``nbdkit --long-options``).
HELP_OPTIONS = ("--h", "--he", "--hel", "--help")
PYTHON_PLUGIN = ("python", "nbdkit-python-plugin.so")


def help_script(argv):
    """The python plugin's script if nbdkit's ``argv`` asks for --help.

    Returns the script argument as given (``./plugin.py`` or the value of
    ``script=...``), or None when there is no --help before ``--`` or no
    python plugin with a script after it.
    """
    args = list(argv[1:])
    options = args[:args.index("--")] if "--" in args else args
    if not any(arg in HELP_OPTIONS for arg in options):
        return None
    for i, arg in enumerate(args):
        if arg in PYTHON_PLUGIN or os.path.basename(arg) == PYTHON_PLUGIN[1]:
            # nbdkit permutes options past the plugin's arguments; the
            # script is the first argument after the plugin that is not
            # an option (nbdkit's magic "script" key) or script=FILE.
            for later in args[i + 1:]:
                if later.startswith("script="):
                    return later[len("script="):]
                if not later.startswith("-") and "=" not in later:
                    return later
            return None
    return None


def is_zramd_plugin(script):
    """Whether ``script`` is plugin.py at the top of a zramd source tree."""
    return (os.path.basename(script) == "plugin.py" and os.path.isfile(
        os.path.join(os.path.dirname(script), "zramd", "params.py")))


def print_help(script):
    """Print ``script``'s config_help under a ``script:`` line, as nbdkit
    prints a plugin's; on failure say where the keys are instead."""
    try:
        _flush_c_stdio()
        namespace = {"__name__": "__nbdkit_help__", "__file__": script,
                     "__builtins__": __builtins__}
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec")
        exec(code, namespace)
        sys.stdout.write("\nscript: %s\n%s\n"
                         % (script, namespace["config_help"].rstrip("\n")))
        sys.stdout.flush()
    except BaseException as err:        # SystemExit too: never at exit
        try:
            sys.stderr.write("zramd: cannot list the keys of %s (%s: %s); "
                             "nbdkit python %s --dump-plugin lists them\n"
                             % (script, type(err).__name__, err, script))
            sys.stderr.flush()
        except BaseException:
            pass


def _flush_c_stdio():
    """nbdkit printed its usage with C stdio; when stdout is a pipe or a
    file it is still in libc's buffer, and ours must come after it."""
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


def _install():
    """Register print_help if this process is nbdkit asked for --help
    about zramd's plugin.py; otherwise do nothing, quickly."""
    try:
        if os.path.basename(os.readlink("/proc/self/exe")) != "nbdkit":
            return
        with open("/proc/self/cmdline", "rb") as f:
            argv = [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]]
        script = help_script(argv)
        if script is None:
            return
        script = os.path.abspath(script)
        if not is_zramd_plugin(script):
            return
        import atexit
        atexit.register(print_help, script)
    except Exception:
        pass


_install()
