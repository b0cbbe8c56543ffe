// A real OpenID Connect provider (panva/oidc-provider, pinned in package.json) for the gateway's
// end-to-end tests (key rotation, sender-constrained tokens).  It issues RFC 9068 JWT access
// tokens through the client_credentials grant; the resource indicator decides the audience.
//
// Sender-constrained tokens:
// - DPoP (RFC 9449) is always on (features.dPoP): a token request carrying a valid `DPoP` proof
//   for the token endpoint gets token_type "DPoP" and cnf.jkt in the JWT; one without a proof
//   still gets a plain Bearer token (no client here sets dpop_bound_access_tokens).
// - Certificate-bound tokens (RFC 8705) with MTLS=1: features.mTLS with
//   certificateBoundAccessTokens, and a second client, MTLS_CLIENT_ID, registered with
//   tls_client_certificate_bound_access_tokens: its tokens carry cnf["x5t#S256"], and a token
//   request without a certificate is refused.  This provider listens on plain http, as if
//   behind a TLS-terminating proxy: getCertificate reads the client certificate from the
//   CERT_HEADER request header, a URL-encoded PEM (nginx's $ssl_client_escaped_cert).  Only a
//   proxy that sets that header afresh may stand in front of a provider configured so.
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
//   MTLS           "1": certificate-bound access tokens for MTLS_CLIENT_ID (see above)
//   MTLS_CLIENT_ID default "gateway-e2e-mtls" (its secret is CLIENT_SECRET too)
//   CERT_HEADER    default "x-ssl-client-cert": the header getCertificate reads
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
const mtls = process.env.MTLS === '1';
const mtlsClientId = process.env.MTLS_CLIENT_ID || 'gateway-e2e-mtls';
const certHeader = (process.env.CERT_HEADER || 'x-ssl-client-cert').toLowerCase();

const issuer = `http://127.0.0.1:${port}`;

const client = {
  client_id: clientId,
  client_secret: clientSecret,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
};
const clients = [client];
if (mtls) {
  // Authenticates with its secret; the certificate only binds its tokens (RFC 8705 §3).
  clients.push({
    ...client,
    client_id: mtlsClientId,
    tls_client_certificate_bound_access_tokens: true,
  });
}

// The client certificate as a PEM string, or undefined: from CERT_HEADER (URL-encoded PEM).
function getCertificate(ctx) {
  const value = ctx.get(certHeader);
  if (!value) {
    return undefined;
  }
  let pem;
  try {
    pem = decodeURIComponent(value);
  } catch {
    return undefined;
  }
  return pem.includes('-----BEGIN CERTIFICATE-----') ? pem : undefined;
}

const provider = new Provider(issuer, {
  clients,
  jwks,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    // The proof algorithms are oidc-provider's defaults (dPoPSigningAlgValues: ES256, Ed25519,
    // EdDSA); no server nonce.
    dPoP: { enabled: true },
    ...(mtls
      ? {
          mTLS: {
            enabled: true,
            certificateBoundAccessTokens: true,
            getCertificate,
            // No tls_client_auth / self_signed_tls_client_auth client: never asked for.
            certificateAuthorized: () => false,
            certificateSubjectMatches: () => false,
          },
        }
      : {}),
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
