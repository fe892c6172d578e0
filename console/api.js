// The Fusion API, on this page's own origin, and the sign-in a deployed console needs
// (OAuth 2.0 authorization code with PKCE; the local stack has no sign-in).

const TOKEN_KEY = "fusion.token";
const PKCE_KEY = "fusion.pkce";
let auth = null;

export class ApiError extends Error {
  constructor(status, body, message) {
    super(message);
    this.status = status;
    this.code = body?.error?.code || "";
    this.details = body?.error?.details || [];
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export async function api(method, path, body, headers = {}) {
  const sent = { ...headers };
  if (body !== undefined) sent["content-type"] = "application/json";
  if (token()) sent.authorization = `Bearer ${token()}`;
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, null, "The Fusion API cannot be reached. Check your connection and that the API is running, then reload.");
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (response.status === 401 && auth) {
    sessionStorage.removeItem(TOKEN_KEY);
    await signIn();
  }
  if (!response.ok) {
    const fallback = response.status >= 500
      ? `The Fusion API failed (HTTP ${response.status}). Try again in a moment.`
      : `The request was refused (HTTP ${response.status}).`;
    throw new ApiError(response.status, data, data?.error?.message || fallback);
  }
  return data;
}

function b64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const redirectUri = () => `${location.origin}/console`;

async function endpoints() {
  if (auth.authorize_url && auth.token_url) return auth;
  const found = await (await fetch(`${auth.issuer.replace(/\/$/, "")}/.well-known/openid-configuration`)).json();
  return { ...auth, authorize_url: found.authorization_endpoint, token_url: found.token_endpoint };
}

async function signIn() {
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const state = b64url(crypto.getRandomValues(new Uint8Array(16)));
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state, back: location.hash }));
  const where = await endpoints();
  const url = new URL(where.authorize_url);
  url.search = new URLSearchParams({
    response_type: "code", client_id: auth.client_id, redirect_uri: redirectUri(), scope: auth.scope,
    state, code_challenge: b64url(new Uint8Array(digest)), code_challenge_method: "S256",
  }).toString();
  location.assign(url.toString());
  await new Promise(() => {}); // the page is leaving
}

async function finishSignIn(code, state) {
  const pending = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  sessionStorage.removeItem(PKCE_KEY);
  if (!pending || pending.state !== state) throw new Error("The sign-in answer does not match this browser's request; sign in again.");
  const where = await endpoints();
  const response = await fetch(where.token_url, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code", client_id: auth.client_id, code,
      redirect_uri: redirectUri(), code_verifier: pending.verifier,
    }),
  });
  const tokens = await response.json();
  if (!response.ok) throw new Error(`Sign-in failed: ${tokens.error_description || tokens.error || response.status}`);
  sessionStorage.setItem(TOKEN_KEY, tokens.access_token || tokens.id_token);
  history.replaceState(null, "", `/console${pending.back || ""}`);
}

// Resolves once the console may call the API: at once locally, after sign-in when deployed.
export async function ready() {
  const config = await api("GET", "/console/config.json");
  auth = config.auth;
  if (!auth) return { signedIn: false };
  const query = new URLSearchParams(location.search);
  if (query.get("error")) throw new Error(`Sign-in failed: ${query.get("error_description") || query.get("error")}`);
  if (query.get("code")) await finishSignIn(query.get("code"), query.get("state"));
  if (!token()) await signIn();
  return { signedIn: true, signOut: () => { sessionStorage.removeItem(TOKEN_KEY); location.assign("/console"); } };
}
