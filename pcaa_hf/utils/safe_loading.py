"""What to say when torch refuses to unpickle a file."""

import re


def weights_only_refusal(error):
    """
    Why `torch.load(..., weights_only=True)` refused a file, in one line: the global it would have had to import
    (torch's own message goes on to suggest `weights_only=False`, which would run whatever code the file holds).
    """
    text = str(error)
    found = re.search(r"WeightsUnpickler error: (.*?)\.(?:\s|$)", text)
    return found[1] if found else " ".join(text.split())
