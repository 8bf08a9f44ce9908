"""Pictures of a decode trajectory: which tokens each forward filled (M2T) or edited (T2T).

`generate(..., trajectory=True)` records, per row and per counted forward, the canvas position of
the window start, the window's tokens after the update, and which window slots were filled or
edited. `trajectory_html` turns one row into a self-contained HTML page (a table: one line per
forward, one column per canvas position, then the final text); `trajectory_png` draws the same
grid with matplotlib (x = canvas position, y = forward index, colour = what happened).
"""

from __future__ import annotations

import html
from typing import Sequence

from llada_jax import optional

# cell states of the grid (the PNG's colour index)
OUTSIDE, MASK, KEPT, FILL, EDIT, PROMPT = range(6)
STATE_NAMES = ("outside the window", "still masked", "unchanged", "filled (M2T)", "edited (T2T)",
               "prompt")
STATE_COLORS = ("#ffffff", "#d0d0d0", "#f3f3f3", "#2ca02c", "#d62728", "#c6dbef")


def _steps(result, row: int) -> list[dict]:
  if result.trajectory is None:
    raise ValueError("the result has no trajectory: decode with generate(..., trajectory=True)")
  if not 0 <= row < len(result.trajectory):
    raise IndexError(f"row {row} not in a batch of {len(result.trajectory)}")
  return result.trajectory[row]


def _token_text(tok: int, result, tokenizer) -> str:
  s = result.settings
  if tok == s.mask_id:
    return "\u00b7"  # middle dot
  if tok == s.eos_id:
    return "\u23ce"  # return symbol: EOS
  if tokenizer is None:
    return str(tok)
  try:
    text = tokenizer.decode([tok])
  except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id alone
    text = ""
  if text == "":
    return f"<{tok}>"
  text = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
  if "\ufffd" in text or not text.isprintable():  # a lone non-UTF-8 byte, a control character
    return f"#{tok}"
  return text


def trajectory_grid(result, row: int, prompt_length: int | None = None):
  """`(states [F, P], tokens [F, P], first canvas position)`: per forward and canvas position
  (P columns spanning every window), the cell state (`OUTSIDE` ... `PROMPT`) and token (-1
  outside the window). Positions before `prompt_length` (if given) are marked `PROMPT`."""
  steps = _steps(result, row)
  mask_id = result.settings.mask_id
  if not steps:
    return [], [], 0
  lo = min(max(s["start"], 0) for s in steps)
  hi = max(s["start"] + len(s["tokens"]) for s in steps)
  states, tokens = [], []
  for s in steps:
    st, tk = [OUTSIDE] * (hi - lo), [-1] * (hi - lo)
    for j, (t, f, e) in enumerate(zip(s["tokens"], s["fill"], s["edit"])):
      p = s["start"] + j
      if p < 0:  # multi-block editing: window slots before the canvas
        continue
      tk[p - lo] = t
      if f:
        st[p - lo] = FILL
      elif e:
        st[p - lo] = EDIT
      elif prompt_length is not None and p < prompt_length:
        st[p - lo] = PROMPT
      elif t == mask_id:
        st[p - lo] = MASK
      else:
        st[p - lo] = KEPT
    states.append(st)
    tokens.append(tk)
  return states, tokens, lo


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em; }
table.traj { border-collapse: collapse; font-family: Menlo, Consolas, monospace; font-size: 12px; }
table.traj td, table.traj th { border: 1px solid #e4e4e4; min-width: 1.6em; height: 1.5em;
  text-align: center; padding: 0 2px; }
table.traj th { color: #888; font-weight: normal; font-size: 10px; }
td.step { color: #555; text-align: right; padding-right: 6px; white-space: nowrap; }
td.tok.kept { background: #f3f3f3; }
td.tok.mask { background: #d0d0d0; color: #777; }
td.tok.prompt { background: #c6dbef; }
td.tok.fill { background: #2ca02c; color: white; font-weight: bold; }
td.tok.edit { background: #d62728; color: white; font-weight: bold; }
td.off { border: none; }
td.count { color: #555; font-size: 11px; white-space: nowrap; padding-left: 6px; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; }
pre.final { background: #f7f7f7; padding: 0.6em; border: 1px solid #ddd; white-space: pre-wrap; }
"""

_CELL_CLASS = {MASK: "tok mask", KEPT: "tok kept", FILL: "tok fill", EDIT: "tok edit",
               PROMPT: "tok prompt"}


def trajectory_html(result, row: int, tokenizer=None, *, prompt: Sequence[int] | None = None,
                    title: str | None = None) -> str:
  """A self-contained HTML page of row `row`'s trajectory: one table line per counted forward
  (`<tr class="fwd">`, labelled with its step number) showing the window's tokens after that
  forward, filled positions green (`class="tok fill"`), edited ones red (`class="tok edit"`),
  masks grey; then the final text. `tokenizer` (anything with `decode(list[int]) -> str`) shows
  text instead of ids; `prompt` (its ids) shades the prompt's positions and is shown too."""
  steps = _steps(result, row)
  prompt_length = None if prompt is None else len(prompt)
  states, tokens, lo = trajectory_grid(result, row, prompt_length)
  width = len(states[0]) if states else 0
  s = result.settings
  out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
         f"<title>{html.escape(title or f'decode trajectory, row {row}')}</title>",
         f"<style>{_CSS}</style></head><body>",
         f"<h2>{html.escape(title or f'Decode trajectory, row {row}')}</h2>",
         f"<p>{html.escape(s.algorithm)}: threshold {s.threshold}, editing threshold "
         f"{s.editing_threshold}, block {s.block_length}, MBE window {s.mbe_window}, "
         f"gen_length {s.gen_length}. NFE {result.nfe[row]}, fills {result.fills[row]}, "
         f"edits {result.edits[row]}, TPF {result.tpf[row]:.2f}.</p>",
         "<p class=\"legend\"><span style=\"background:#2ca02c;color:white\">filled (M2T)</span>"
         "<span style=\"background:#d62728;color:white\">edited (T2T)</span>"
         "<span style=\"background:#d0d0d0\">\u00b7 mask</span>"
         "<span style=\"background:#f3f3f3\">unchanged</span>"
         + ("<span style=\"background:#c6dbef\">prompt</span>" if prompt is not None else "")
         + " \u23ce = EOS</p>",
         "<table class=\"traj\">",
         "<tr><th>forward</th>" + "".join(f"<th>{lo + j}</th>" for j in range(width))
         + "<th></th></tr>"]
  for k, (st, tk) in enumerate(zip(states, tokens)):
    cells = []
    for state, t in zip(st, tk):
      if state == OUTSIDE:
        cells.append("<td class=\"off\"></td>")
      else:
        txt = html.escape(_token_text(t, result, tokenizer))
        cells.append(f"<td class=\"{_CELL_CLASS[state]}\" title=\"id {t}\">{txt}</td>")
    n_fill = sum(x == FILL for x in st)
    n_edit = sum(x == EDIT for x in st)
    out.append(f"<tr class=\"fwd\"><td class=\"step\">step {k + 1}</td>" + "".join(cells)
               + f"<td class=\"count\">+{n_fill} fill, {n_edit} edit</td></tr>")
  out.append("</table>")
  if len(steps) < result.nfe[row]:
    out.append(f"<p>(only the first {len(steps)} of {result.nfe[row]} forwards were recorded)"
               "</p>")
  ids = result.output_ids[row]
  if tokenizer is not None:
    final = tokenizer.decode(ids)
    ptxt = tokenizer.decode(list(prompt)) if prompt is not None else None
  else:
    final = " ".join(map(str, ids))
    ptxt = " ".join(map(str, prompt)) if prompt is not None else None
  if ptxt is not None:
    out.append(f"<h3>Prompt</h3><pre class=\"final\">{html.escape(ptxt)}</pre>")
  out.append(f"<h3>Final text</h3><pre class=\"final\">{html.escape(final)}</pre>")
  out.append("</body></html>")
  return "\n".join(out)


def trajectory_png(result, row: int, path: str, *, tokenizer=None,
                   prompt: Sequence[int] | None = None, title: str | None = None) -> str:
  """Draws row `row`'s trajectory as a grid (x = canvas position, y = forward index, colour =
  filled / edited / unchanged / still masked) into the PNG `path`; returns `path`. With a
  `tokenizer`, small grids also print each cell's token."""
  plt = optional.require("matplotlib.pyplot", "drawing a trajectory PNG")
  from matplotlib.colors import ListedColormap  # noqa: PLC0415 (present once pyplot is)
  from matplotlib.patches import Patch  # noqa: PLC0415

  prompt_length = None if prompt is None else len(prompt)
  states, tokens, lo = trajectory_grid(result, row, prompt_length)
  n_fwd, width = len(states), (len(states[0]) if states else 0)
  fig_w = min(max(6.0, 0.32 * width + 2.5), 30.0)
  fig_h = min(max(3.0, 0.3 * n_fwd + 1.8), 30.0)
  fig, ax = plt.subplots(figsize=(fig_w, fig_h))
  if n_fwd:
    ax.imshow(states, cmap=ListedColormap(STATE_COLORS), vmin=0, vmax=len(STATE_COLORS) - 1,
              aspect="auto", interpolation="nearest",
              extent=(lo - 0.5, lo + width - 0.5, n_fwd + 0.5, 0.5))
    if tokenizer is not None and width <= 64 and n_fwd <= 64:
      for k in range(n_fwd):
        for j in range(width):
          if states[k][j] != OUTSIDE:
            color = "white" if states[k][j] in (FILL, EDIT) else "black"
            ax.text(lo + j, k + 1, _token_text(tokens[k][j], result, tokenizer), ha="center",
                    va="center", fontsize=7, color=color, family="monospace")
  ax.set_xlabel("canvas position")
  ax.set_ylabel("forward (step)")
  if n_fwd <= 40:
    ax.set_yticks(range(1, n_fwd + 1))
  s = result.settings
  if title is not None:  # wrap long titles to the figure's width (about 11 characters an inch)
    import textwrap
    title = "\n".join(textwrap.wrap(title, max(int(fig_w * 11), 40)))
  ax.set_title(title or f"row {row}: {s.algorithm}, threshold {s.threshold}, edit "
               f"{s.editing_threshold}, block {s.block_length}, MBE {s.mbe_window} | NFE "
               f"{result.nfe[row]}, fills {result.fills[row]}, edits {result.edits[row]}",
               fontsize=9)
  used = sorted({x for st in states for x in st} - {OUTSIDE})
  ax.legend(handles=[Patch(facecolor=STATE_COLORS[i], edgecolor="#999", label=STATE_NAMES[i])
                     for i in used], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
