// Presentation only: every figure arrives from the API; these functions only write it for people.

export function human(n) {
  if (n === null || n === undefined || n === "") return "–";
  const x = Number(n);
  for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (Math.abs(x) >= size) return `${(x / size).toFixed(2)}${unit}`;
  }
  return `${x}`;
}

export const tokens = (n) => (n === null || n === undefined ? "–" : `${human(n)} tokens`);
export const params = (n) => (n === null || n === undefined ? "–" : `${human(n)} params`);
export const grouped = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

// Totals come in cents; components keep their exact sub-cent value (without trailing zeros).
export function money(value) {
  if (value === null || value === undefined || value === "") return "–";
  let text = String(value);
  const [whole, frac] = text.split(".");
  if (frac !== undefined && frac.length > 2) text = `${whole}.${frac.replace(/0+$/, "")}`;
  return `$${text}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(Number(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

export const fixed = (v, digits = 2) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  // The reader's own time, with its zone named, so that nobody takes UTC for local time.
  return d.toLocaleString("en-GB", { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
    minute: "2-digit", second: "2-digit", timeZoneName: "short" });
}
