// A real OpenID Connect provider (panva/oidc-provider, pinned in package.json) for the gateway's
// end-to-end key-rotation test.  It issues RFC 9068 JWT access tokens through the
// client_credentials grant; the resource indicator decides the audience.
//
// Environment:
//   PORT           TCP port on 127.0.0.1 (required); the issuer is http://127.0.0.1:PORT
//   JWKS_FILE      JSON file {"keys": [...]} of PRIVATE JWKs (required).  The provider signs
//                  with the FIRST key of the matching alg: oidc-provider's KeyStore keeps the
//                  keys in file order, and selectForSign() (lib/helpers/keystore.js) filters
//                  them and stable-sorts by a score that is equal for keys carrying the same
//                  fields (alg and use); lib/models/formats/jwt.js takes element [0].  So key
//                  ORDER chooses the signing key: give every key "alg" and "use".
//   CLIENT_ID      default "gateway-e2e"
//   CLIENT_SECRET  default "gateway-e2e-secret"
//   RESOURCE       default "https://orders.api.test/" (the only resource server known)
//   SCOPE          default "orders:read"
//   JWKS_MAX_AGE   if set, the jwks_uri response carries "Cache-Control: public, max-age=N"
//                  (oidc-provider itself sends no Cache-Control on it)
//
// Prints "READY" on stdout once listening; exits 0 on SIGTERM or SIGINT.

import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`provider.mjs: ${name} is required`);
    process.exit(2);
  }
  return value;
}

const port = Number.parseInt(required('PORT'), 10);
const jwks = JSON.parse(readFileSync(required('JWKS_FILE'), 'utf8'));
const clientId = process.env.CLIENT_ID || 'gateway-e2e';
const clientSecret = process.env.CLIENT_SECRET || 'gateway-e2e-secret';
const resource = process.env.RESOURCE || 'https://orders.api.test/';
const scope = process.env.SCOPE || 'orders:read';
const jwksMaxAge = process.env.JWKS_MAX_AGE;

const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  jwks,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // No resource parameter: the orders API.
      defaultResource: async (ctx, client, oneOf) => oneOf ?? resource,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        if (resourceIndicator !== resource) {
          throw new errors.InvalidTarget();
        }
        return {
          scope,
          audience: resourceIndicator,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  // Static signing keys only: nothing here ever needs a cookie, but the option must be set.
  cookies: { keys: ['gateway-e2e-cookie-key'] },
});

if (jwksMaxAge !== undefined) {
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/jwks' && ctx.status === 200) {
      ctx.set('cache-control', `public, max-age=${jwksMaxAge}`);
    }
  });
}

provider.on('server_error', (ctx, err) => {
  console.error('provider.mjs: server_error', err);
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write('READY\n');
});

server.on('error', (err) => {
  console.error('provider.mjs: cannot listen', err);
  process.exit(1);
});

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
