"""Live views in a notebook: how long they stay live."""
from __future__ import annotations


import pytest

import dragon_nb

pytest.importorskip("ipywidgets")


@pytest.mark.timeout(30)
def test_a_dashboard_stops_refreshing_after_its_time_and_says_so():
    from dragon_nb.widgets.live import LIVE_FOR_S, Dashboard
    assert Dashboard.live_for == LIVE_FOR_S == 600.0
    with dragon_nb.Runtime(nodes=1) as rt:
        dash = Dashboard(rt)
        dash.live_for = 0.5
        dash.start()
        dash._thread.join(10)
        assert not dash._thread.is_alive()
        assert "no longer live after" in dash.title.value
        assert rt.alive                      # the view ended, not the runtime
