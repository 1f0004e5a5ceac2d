// panva/oidc-provider (a certified OpenID Provider) on loopback, for latchkey's
// interop tests. `latchkey_testkit::oidc::OidcProvider` starts and drives it;
// it can also be run by hand: `node interop/oidc/server.mjs --client-id a
// --client-secret b --redirect-uri http://127.0.0.1:8080/cb`.
//
// Options (command line, or the environment variable named; the command line
// wins). Booleans take true/false/1/0/yes/no/on/off.
//
//   --port N                  OIDC_PORT                  0 = pick a free port (default 0)
//   --client-id ID            OIDC_CLIENT_ID             the one registered client (required)
//   --client-secret SECRET    OIDC_CLIENT_SECRET         its secret (required; prefer the
//                                                        variable: argv is visible in `ps`)
//   --redirect-uri URI        OIDC_REDIRECT_URIS         repeatable; the variable is
//                                                        whitespace-separated (at least one)
//   --client-auth basic|post  OIDC_CLIENT_AUTH           token_endpoint_auth_method:
//                                                        client_secret_basic (default) or
//                                                        client_secret_post
//   --access-ttl SECONDS      OIDC_ACCESS_TTL            access token lifetime (default 3600)
//   --rotate-refresh-tokens B OIDC_ROTATE_REFRESH_TOKENS rotate on every refresh (default true);
//                                                        reusing a rotated-out token revokes
//                                                        the whole grant
//   --scope S                 OIDC_EXTRA_SCOPES          repeatable; extra scopes besides
//                                                        `openid offline_access` (default files)
//   --lenient-client-auth     OIDC_LENIENT_CLIENT_AUTH   accept both basic and post whatever the
//                                                        client registered (oidc-provider's own
//                                                        behaviour); by default this server
//                                                        answers 401 invalid_client to the
//                                                        method the client did not register
//   --exit-on-stdin-eof       OIDC_EXIT_ON_STDIN_EOF     exit when stdin closes, so the server
//                                                        dies with a parent that holds the pipe
//   --verbose                 OIDC_VERBOSE               log oidc-provider's notices and
//                                                        request errors to stderr
//
// Once ready it prints exactly one line to stdout and nothing else ever:
//
//   LISTENING http://127.0.0.1:PORT issuer=http://127.0.0.1:PORT
//
// The issuer is the base URL; discovery is at /.well-known/openid-configuration.
//
// Interactions (login and consent) are this file's own plain HTML forms at
// /interaction/:uid — no scripts, no external resources, so an HTTP client that
// keeps cookies and a headless browser can both complete them. Any non-empty
// username is accepted with any password; the account id is the username.
// Device flow pages are oidc-provider's own at /device, restyled without
// external fonts. Page elements have stable ids for browser tests: login
// `#username`, `#password`, `#submit` (and `#abort`); consent `#scopes`,
// `#allow`, `#deny`; device `input[name=user_code]`, `#submit`, then
// `#confirm` or `#abort`, ending at `#success`; errors `#error`.
//
// Besides configuration, two things differ from a stock oidc-provider (see
// the comment above CLIENT_AUTH_PATHS below): the client authentication method
// the client did not register is refused, and offline_access yields a refresh
// token without prompt=consent. Everything is in memory and lost on exit.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

// ---------------------------------------------------------------- options

function fail(message) {
  process.stderr.write(`server.mjs: ${message}\n`);
  process.exit(2);
}

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string', multiple: true },
    'client-auth': { type: 'string' },
    'access-ttl': { type: 'string' },
    'rotate-refresh-tokens': { type: 'string' },
    scope: { type: 'string', multiple: true },
    'lenient-client-auth': { type: 'boolean' },
    'exit-on-stdin-eof': { type: 'boolean' },
    verbose: { type: 'boolean' },
  },
  strict: true,
});

const env = process.env;

function bool(name, value, fallback) {
  if (value === undefined || value === '') return fallback;
  const v = String(value).toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  return fail(`${name}: expected a boolean, got ${JSON.stringify(value)}`);
}

function int(name, value, fallback, min) {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) fail(`${name}: expected an integer >= ${min}, got ${JSON.stringify(value)}`);
  return n;
}

const words = (s) => (s ? s.split(/\s+/).filter(Boolean) : undefined);

const config = {
  port: int('--port', args.port ?? env.OIDC_PORT, 0, 0),
  clientId: args['client-id'] ?? env.OIDC_CLIENT_ID,
  clientSecret: args['client-secret'] ?? env.OIDC_CLIENT_SECRET,
  redirectUris: args['redirect-uri'] ?? words(env.OIDC_REDIRECT_URIS) ?? [],
  clientAuth: args['client-auth'] ?? env.OIDC_CLIENT_AUTH ?? 'basic',
  accessTtl: int('--access-ttl', args['access-ttl'] ?? env.OIDC_ACCESS_TTL, 3600, 1),
  rotate: bool('--rotate-refresh-tokens', args['rotate-refresh-tokens'] ?? env.OIDC_ROTATE_REFRESH_TOKENS, true),
  extraScopes: args.scope ?? words(env.OIDC_EXTRA_SCOPES) ?? ['files'],
  lenientClientAuth: args['lenient-client-auth'] || bool('OIDC_LENIENT_CLIENT_AUTH', env.OIDC_LENIENT_CLIENT_AUTH, false),
  exitOnStdinEof: args['exit-on-stdin-eof'] || bool('OIDC_EXIT_ON_STDIN_EOF', env.OIDC_EXIT_ON_STDIN_EOF, false),
  verbose: args.verbose || bool('OIDC_VERBOSE', env.OIDC_VERBOSE, false),
};

if (!config.clientId) fail('--client-id (or OIDC_CLIENT_ID) is required');
if (!config.clientSecret) fail('--client-secret (or OIDC_CLIENT_SECRET) is required');
if (config.redirectUris.length === 0) fail('at least one --redirect-uri (or OIDC_REDIRECT_URIS) is required');
const authMethods = { basic: 'client_secret_basic', post: 'client_secret_post' };
if (!authMethods[config.clientAuth]) fail(`--client-auth: expected basic or post, got ${JSON.stringify(config.clientAuth)}`);

// stdout carries the LISTENING line only. oidc-provider writes its notices
// with console.info (stdout) and console.warn; send those to stderr when
// verbose and drop them otherwise.
const log = config.verbose ? (...a) => console.error(...a) : () => {};
console.log = log;
console.info = log;
console.warn = log;
console.debug = log;

if (config.exitOnStdinEof) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));

// Imported only now so that its load-time notice (it asks for Node.js 22+ and
// warns on 20, which works) goes through the console set up above.
const { default: Provider } = await import('oidc-provider');

// ---------------------------------------------------------------- pages

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'";
const STYLE = 'body{font-family:sans-serif;max-width:24em;margin:2em auto}'
  + 'label,input,button{display:block;margin:.4em 0}.error{color:#b00}';

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)}</title>
<style>${STYLE}</style>
</head>
<body>
<h1>${escapeHtml(title)}</h1>
${body}
</body>
</html>
`;
}

// ---------------------------------------------------------------- provider

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > 64 * 1024) {
        reject(new Error('body too large'));
        req.destroy();
      } else {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('content-type', 'text/html; charset=utf-8');
  res.setHeader('cache-control', 'no-store');
  res.setHeader('content-security-policy', CSP);
  res.end(html);
}

const loginPage = (uid, client, error) => page('Sign in', `
<p>Signing in to <strong>${escapeHtml(client)}</strong>. Any username and password are accepted.</p>
${error ? `<p class="error" id="error">${escapeHtml(error)}</p>` : ''}
<form id="login" method="post" action="/interaction/${uid}/login">
<label for="username">Username</label>
<input id="username" name="username" type="text" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password">
<button id="submit" type="submit">Sign in</button>
</form>
<form id="cancel" method="post" action="/interaction/${uid}/abort">
<button id="abort" type="submit">Cancel</button>
</form>`);

const consentPage = (uid, client, account, scopes) => page('Authorize', `
<p><strong>${escapeHtml(client)}</strong> asks <strong>${escapeHtml(account)}</strong> for:</p>
<ul id="scopes">${scopes.map((s) => `<li>${escapeHtml(s)}</li>`).join('')}</ul>
<form id="consent" method="post" action="/interaction/${uid}/confirm">
<button id="allow" type="submit">Allow</button>
</form>
<form id="deny-form" method="post" action="/interaction/${uid}/abort">
<button id="deny" type="submit">Deny</button>
</form>`);

const makeProvider = (() => {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return (issuer) => new Provider(issuer, {
    clients: [{
      client_id: config.clientId,
      client_secret: config.clientSecret,
      client_name: config.clientId,
      redirect_uris: config.redirectUris,
      response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      token_endpoint_auth_method: authMethods[config.clientAuth],
    }],
    jwks: { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: 'interop', use: 'sig', alg: 'RS256' }] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', ...config.extraScopes],
    claims: { openid: ['sub'] },
    pkce: { required: () => true, methods: ['S256'] },
    ttl: { AccessToken: config.accessTtl },
    // Like Microsoft: offline_access alone gets a refresh token. This is
    // oidc-provider's default policy too, spelt out because the tests depend
    // on it; it only works because offline_access survives the authorization
    // request, which needs the rewrite described above CLIENT_AUTH_PATHS.
    issueRefreshToken: async (_ctx, client, source) => (
      client.grantTypeAllowed('refresh_token') && source.scopes.has('offline_access')
    ),
    rotateRefreshToken: config.rotate,
    findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    interactions: { url: async (_ctx, interaction) => `/interaction/${interaction.uid}` },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out)
        .map(([k, v]) => `<p><strong>${escapeHtml(k)}</strong>: <span id="${escapeHtml(k)}">${escapeHtml(v)}</span></p>`)
        .join('\n'));
    },
    clientBasedCORS: () => false,
    extraParams: [IMPLICIT_CONSENT],
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      introspection: { enabled: true },
      deviceFlow: {
        enabled: true,
        userCodeInputSource: async (ctx, form, _out, err) => {
          let msg = '<p>Enter the code displayed on your device.</p>';
          if (err?.name === 'AbortedError') {
            msg = '<p class="error" id="aborted">The sign-in request was interrupted.</p>';
          } else if (err?.name === 'NoCodeError' || err?.userCode) {
            msg = '<p class="error" id="error">The code you entered is incorrect. Try again.</p>';
          } else if (err) {
            msg = '<p class="error" id="error">There was an error processing your request.</p>';
          }
          ctx.body = page('Device sign-in', `${msg}\n${form}\n<button id="submit" type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        userCodeConfirmSource: async (ctx, form, client, _deviceInfo, userCode) => {
          ctx.body = page('Confirm device', `<p><strong>${escapeHtml(client.clientName || client.clientId)}</strong>
asks to sign in on a device showing <code id="user-code">${escapeHtml(userCode)}</code>.</p>
${form}
<button id="confirm" type="submit" form="op.deviceConfirmForm">Continue</button>
<button id="abort" type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
        },
        successSource: async (ctx) => {
          ctx.body = page('Device sign-in complete', '<p id="success">Your device is signed in. You can close this page.</p>');
        },
      },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource: async (ctx, form) => {
          ctx.body = page('Sign out', `${form}
<button id="logout" type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button>
<button id="stay" type="submit" form="op.logoutForm">Stay signed in</button>`);
        },
        postLogoutSuccessSource: async (ctx) => {
          ctx.body = page('Signed out', '<p id="success">You are signed out.</p>');
        },
      },
    },
  });
})();

// ---------------------------------------------------------------- interactions

const IMPLICIT_CONSENT = 'x_interop_implicit_consent';

const missingScopes = (d) => [...(d.missingOIDCScope ?? []), ...Object.values(d.missingResourceScopes ?? {}).flat()];

/** Grants what the consent prompt found missing and resumes the authorization. */
async function consent(oidc, req, res, { prompt: { details: d }, grantId: existing, session, params }) {
  const grant = existing
    ? await oidc.Grant.find(existing)
    : new oidc.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  for (const detail of d.rar ?? []) grant.addRar(detail);
  const grantId = await grant.save();
  return oidc.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

async function interaction(oidc, req, res, uid, action) {
  const details = await oidc.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const { prompt, params, session } = details;
  const clientName = params.client_id;

  if (req.method === 'GET' && action === undefined) {
    if (prompt.name === 'login') return send(res, 200, loginPage(uid, clientName));
    if (prompt.name === 'consent') {
      const scopes = missingScopes(prompt.details);
      const nothingNew = scopes.length === 0 && !prompt.details.missingOIDCClaims?.length && !prompt.details.rar;
      if (params[IMPLICIT_CONSENT] && nothingNew) return consent(oidc, req, res, details);
      return send(res, 200, consentPage(uid, clientName, session?.accountId ?? '', scopes));
    }
    return send(res, 501, page('Error', `<p>prompt ${escapeHtml(prompt.name)} is not implemented</p>`));
  }
  if (req.method !== 'POST') return send(res, 405, page('Error', '<p>method not allowed</p>'));

  const form = await readBody(req);
  if (action === 'login') {
    if (prompt.name !== 'login') return send(res, 400, page('Error', '<p>not at the login step</p>'));
    const username = (form.get('username') ?? '').trim();
    if (!username) return send(res, 400, loginPage(uid, clientName, 'Enter a username.'));
    return oidc.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
  }
  if (action === 'confirm') {
    if (prompt.name !== 'consent') return send(res, 400, page('Error', '<p>not at the consent step</p>'));
    return consent(oidc, req, res, details);
  }
  if (action === 'abort') {
    return oidc.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
  }
  return send(res, 404, page('Error', '<p>not found</p>'));
}

// ---------------------------------------------------------------- server

const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(config.port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;
const oidc = makeProvider(issuer);
oidc.on('server_error', (_ctx, err) => process.stderr.write(`oidc-provider server_error: ${err?.stack ?? err}\n`));
if (config.verbose) {
  for (const event of ['authorization.error', 'grant.error', 'introspection.error', 'revocation.error',
    'device_authorization.error', 'code_verification.error', 'end_session.error']) {
    oidc.on(event, (_ctx, err) => log(`oidc-provider ${event}: ${err?.error ?? err?.name} ${err?.error_description ?? ''}`));
  }
}
const callback = oidc.callback();

// Two adjustments happen here, before oidc-provider sees a request.
//
// 1. Strict client authentication. oidc-provider accepts client_secret_basic
//    and client_secret_post alike, whichever the client registered. Real
//    providers are often strict, and the tests must catch a client that uses
//    the wrong one: unless --lenient-client-auth, the unregistered method gets
//    401 invalid_client.
//
// 2. offline_access without prompt=consent. oidc-provider follows OIDC Core
//    §11 and drops offline_access from an authorization request whose prompt
//    lacks `consent`, so no refresh token would be issued. Providers such as
//    Microsoft issue one for offline_access alone. So an authorization request
//    (GET or POST /auth, or a pushed one at /request) that asks for
//    offline_access gets `consent` added to its prompt (unless it has
//    prompt=none) and is marked with IMPLICIT_CONSENT; the consent step then
//    completes by itself when nothing new needs consenting, so the user sees
//    exactly what they would have without the added prompt. Request objects
//    (JAR) are not rewritten.
const CLIENT_AUTH_PATHS = new Set(['/token', '/token/revocation', '/token/introspection', '/device/auth', '/request']);
const AUTHORIZATION_PATHS = new Set(['/auth', '/request']);

function invalidClient(res, description) {
  res.statusCode = 401;
  res.setHeader('content-type', 'application/json; charset=utf-8');
  res.setHeader('cache-control', 'no-store');
  if (config.clientAuth === 'basic') res.setHeader('www-authenticate', 'Basic realm="interop"');
  res.end(JSON.stringify({ error: 'invalid_client', error_description: description }));
}

/** Adds `consent` to the prompt of a request for offline_access; true if it changed `params`. */
function keepOfflineAccess(params) {
  if (params.has('request') || params.has('request_uri')) return false;
  if (!(params.get('scope') ?? '').split(' ').includes('offline_access')) return false;
  const prompt = (params.get('prompt') ?? '').split(' ').filter(Boolean);
  if (prompt.includes('none') || prompt.includes('consent')) return false;
  params.set('prompt', [...prompt, 'consent'].join(' '));
  params.set(IMPLICIT_CONSENT, '1');
  return true;
}

/** Rewrites or answers `req` as described above; false if it answered. */
async function preprocess(req, res, url) {
  const { pathname } = url;
  if (req.method === 'GET' && pathname === '/auth') {
    if (keepOfflineAccess(url.searchParams)) req.url = `${url.pathname}${url.search}`;
    return true;
  }
  if (req.method !== 'POST') return true;
  const strict = !config.lenientClientAuth && CLIENT_AUTH_PATHS.has(pathname);
  if (strict && config.clientAuth === 'post' && /^basic /i.test(req.headers.authorization ?? '')) {
    invalidClient(res, 'this client authenticates with client_secret_post, not client_secret_basic');
    return false;
  }
  const form = /^application\/x-www-form-urlencoded/i.test(req.headers['content-type'] ?? '');
  if (!form || !((strict && config.clientAuth === 'basic') || AUTHORIZATION_PATHS.has(pathname))) return true;

  // Read the body here; oidc-provider then uses the already-read req.body.
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 56 * 1024) throw new Error('request body too large');
    chunks.push(chunk);
  }
  req.body = Buffer.concat(chunks);
  const params = new URLSearchParams(req.body.toString('utf8'));
  if (strict && config.clientAuth === 'basic' && params.has('client_secret')) {
    invalidClient(res, 'this client authenticates with client_secret_basic, not client_secret_post');
    return false;
  }
  if (AUTHORIZATION_PATHS.has(pathname) && keepOfflineAccess(params)) {
    req.body = Buffer.from(params.toString(), 'utf8');
  }
  return true;
}

server.on('request', (req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname === '/favicon.ico') {
    res.statusCode = 204;
    res.end();
    return;
  }
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?\/?$/.exec(url.pathname);
  if (match) {
    interaction(oidc, req, res, match[1], match[2]).catch((err) => {
      log(`interaction error: ${err?.name}: ${err?.message}`);
      if (!res.headersSent) {
        const expired = err?.name === 'SessionNotFound';
        send(res, 400, page('Error', `<p id="error">${expired
          ? 'This sign-in request has expired or its cookie is missing; start again.'
          : 'The sign-in request could not be processed.'}</p>`));
      } else {
        res.end();
      }
    });
    return;
  }
  preprocess(req, res, url).then((pass) => pass && callback(req, res), (err) => {
    log(`request error: ${err?.message}`);
    res.destroy();
  });
});

process.stdout.write(`LISTENING ${issuer} issuer=${issuer}\n`);
