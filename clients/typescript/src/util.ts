// Small helpers with no dependencies: JWT expiry, ids, jittered backoff.

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** Decodes base64url to a binary string (no atob: React Native lacks it). */
function base64UrlDecode(input: string): string {
  const s = input.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  let out = "";
  let buffer = 0;
  let bits = 0;
  for (let i = 0; i < s.length; i++) {
    const v = B64.indexOf(s.charAt(i));
    if (v < 0) throw new Error("invalid base64url");
    buffer = (buffer << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += String.fromCharCode((buffer >> bits) & 0xff);
    }
  }
  return out;
}

/**
 * The `exp` claim of a JWT in milliseconds since the epoch, read WITHOUT
 * verifying the signature (only the server can do that); null when the token
 * has no readable numeric `exp`.
 */
export function tokenExpiryMs(token: string): number | null {
  const parts = token.split(".");
  if (parts.length < 2) return null;
  try {
    const payload = JSON.parse(base64UrlDecode(parts[1])) as { exp?: unknown };
    return typeof payload.exp === "number" && isFinite(payload.exp) ? payload.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** A random `clientMessageId`: "c-" and 24 hex digits (well under the 64-char limit). */
export function randomId(): string {
  const bytes = new Uint8Array(12);
  const c = (globalThis as { crypto?: { getRandomValues?: (a: Uint8Array) => Uint8Array } }).crypto;
  if (c && typeof c.getRandomValues === "function") {
    c.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  let hex = "c-";
  for (let i = 0; i < bytes.length; i++) hex += (bytes[i] + 0x100).toString(16).slice(1);
  return hex;
}

/**
 * Exponential backoff with "equal jitter": attempt n waits between half and
 * all of min(max, initial * 2^n), so clients that failed together spread out
 * but none retries at once.
 */
export function backoffMs(attempt: number, initialMs: number, maxMs: number, random: () => number): number {
  const ceiling = Math.min(maxMs, initialMs * Math.pow(2, Math.min(attempt, 30)));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
