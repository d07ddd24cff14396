"""nbval, taught the one message it drops: ``update_display_data``.

When a Pool call ends, its live progress widget replaces itself with a static
table by updating its display (an ``update_display_data`` message for the
widget's display id). Notebook front ends and nbclient (which
``jupyter nbconvert --execute`` uses, and which stored these notebooks'
outputs) apply the update; nbval 0.11 prints "unhandled iopub msg" and drops
it, so it would compare the widget's first frame with the stored final table
and fail on every Pool map.

This plugin makes nbval apply display updates to the outputs of the cell it is
running, as nbclient does. It skips, loosens or ignores nothing: the final
tables are compared, through notebooks/sanitize.cfg like every other output.
Without nbval installed it does nothing.
"""
from __future__ import annotations

try:
    from nbval.kernel import RunningKernel
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:                      # nbval not installed: nothing to patch
    RunningKernel = None

if RunningKernel is not None and not getattr(IPyNbFile, "_dnb_display_updates", False):
    IPyNbFile._dnb_display_updates = True
    _execute = RunningKernel.execute_cell_input
    _runtest = IPyNbCell.runtest
    _get_message = IPyNbFile.get_kernel_message

    def execute_cell_input(self, cell_input, allow_stdin=None):
        msg_id = _execute(self, cell_input, allow_stdin=allow_stdin)
        self._dnb_msg_id = msg_id          # the cell whose messages count
        return msg_id

    def runtest(self):
        self.parent._dnb_cell = self
        self.parent._dnb_displays = {}     # display id -> indexes in the cell's outputs
        try:
            return _runtest(self)
        finally:
            self.parent._dnb_cell = None

    def get_kernel_message(self, timeout=None, stream="iopub"):
        msg = _get_message(self, timeout=timeout, stream=stream)
        cell = getattr(self, "_dnb_cell", None)
        outs = getattr(cell, "test_outputs", None)
        if stream != "iopub" or outs is None:
            return msg
        if msg["parent_header"].get("msg_id") != getattr(self.kernel, "_dnb_msg_id", None):
            return msg                     # nbval skips it too
        content = msg["content"]
        display_id = (content.get("transient") or {}).get("display_id")
        if not display_id:
            return msg
        if msg["msg_type"] in ("display_data", "execute_result"):
            # nbval appends this output to the cell's outputs when we return it
            self._dnb_displays.setdefault(display_id, []).append(len(outs))
        elif msg["msg_type"] == "update_display_data":
            for i in self._dnb_displays.get(display_id, ()):
                outs[i]["data"] = content["data"]
                outs[i]["metadata"] = content.get("metadata", {})
        return msg

    RunningKernel.execute_cell_input = execute_cell_input
    IPyNbCell.runtest = runtest
    IPyNbFile.get_kernel_message = get_kernel_message
