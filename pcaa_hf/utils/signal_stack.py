"""
The calling thread's alternate signal stack, kept across calls into native libraries that replace it.

OpenVINO's CPU plugin (2026.4) installs an alternate signal stack of its own on the thread that compiles a model and,
when the plugin is released, reinstalls the stack it found there. Two compiled models released out of order (each
transformers `OpenVINOModelRunner` has its own `openvino.Core`) leave the thread on a stack that was freed, and the
next signal handled on that thread kills the process with SIGSEGV: Python runs its signal handlers' C part on the
alternate stack, so the SIGCHLD of a finished subprocess or DataLoader worker is enough. `keep_signal_stack` around
each compilation keeps the thread on its own stack: every plugin then finds, and later reinstalls, that one.
"""

import ctypes
import logging
import platform
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class _StackT(ctypes.Structure):
    """`stack_t` of <signal.h> (Linux)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _read():
    """The `sigaltstack` function and the calling thread's stack (a `_StackT`), or (None, None) where unreadable."""
    if platform.system() != "Linux":
        return None, None
    sigaltstack = getattr(ctypes.CDLL(None, use_errno=True), "sigaltstack", None)
    stack = _StackT()
    if sigaltstack is None or sigaltstack(None, ctypes.byref(stack)) != 0:
        return None, None
    return sigaltstack, stack


def current_signal_stack():
    """(address, size, flags) of the calling thread's alternate signal stack, or None where it cannot be read."""
    _, stack = _read()
    return None if stack is None else (stack.ss_sp, stack.ss_size, stack.ss_flags)


@contextmanager
def keep_signal_stack():
    """
    Reinstall the calling thread's alternate signal stack when the block ends (see the module's docstring); does
    nothing where the stack cannot be read (not Linux).
    """
    sigaltstack, saved = _read()
    try:
        yield
    finally:
        if sigaltstack is not None and sigaltstack(ctypes.byref(saved), None) != 0:
            logger.warning("Could not reinstall this thread's alternate signal stack (errno %d): a signal handled "
                           "on it later may end the process.", ctypes.get_errno())


__all__ = ["current_signal_stack", "keep_signal_stack"]
