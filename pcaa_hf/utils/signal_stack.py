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
import platform
from contextlib import contextmanager


class _StackT(ctypes.Structure):
    """`stack_t` of <signal.h> (Linux)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack():
    if platform.system() != "Linux":
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "sigaltstack", None)


def current_signal_stack():
    """(address, size, flags) of the calling thread's alternate signal stack, or None where it cannot be read."""
    sigaltstack = _sigaltstack()
    if sigaltstack is None:
        return None
    stack = _StackT()
    if sigaltstack(None, ctypes.byref(stack)) != 0:
        return None
    return stack.ss_sp, stack.ss_size, stack.ss_flags


@contextmanager
def keep_signal_stack():
    """
    Reinstall the calling thread's alternate signal stack when the block ends (see the module's docstring); does
    nothing where the stack cannot be read (not Linux).
    """
    sigaltstack = _sigaltstack()
    saved = _StackT()
    if sigaltstack is None or sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        sigaltstack(ctypes.byref(saved), None)


__all__ = ["current_signal_stack", "keep_signal_stack"]
