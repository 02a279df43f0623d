// A real OpenID provider (panva oidc-provider) for tests and the demo.
// Client-credentials clients carry roles/upn/oid/tid (and fhirUser when set) that end up as access-token claims.
// Env: PORT (9400), ISSUER, AUDIENCE (api://fhir-gateway), TOKEN_TTL (300 s), KEYS_FILE.
// The signing key is persisted in KEYS_FILE so its kid survives restarts; delete the file to rotate.
import fs from 'node:fs';
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const PORT = Number(process.env.PORT || 9400);
const ISSUER = process.env.ISSUER || `http://127.0.0.1:${PORT}`;
const AUDIENCE = process.env.AUDIENCE || 'api://fhir-gateway';
const TTL = Number(process.env.TOKEN_TTL || 300);
const KEYS_FILE = process.env.KEYS_FILE || './keys.json';
const TENANT_A = process.env.TENANT_A || '11111111-1111-1111-1111-111111111111';
const TENANT_B = process.env.TENANT_B || '22222222-2222-2222-2222-222222222222';
const TENANT_X = process.env.TENANT_X || '99999999-9999-9999-9999-999999999999';

async function loadKeys() {
  if (fs.existsSync(KEYS_FILE)) return JSON.parse(fs.readFileSync(KEYS_FILE, 'utf8'));
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = await exportJWK(privateKey);
  jwk.kid = `k-${Date.now().toString(36)}`;
  jwk.alg = 'RS256';
  jwk.use = 'sig';
  const keys = { keys: [jwk] };
  fs.writeFileSync(KEYS_FILE, JSON.stringify(keys));
  return keys;
}

const client = (id, roles, tid, extra = {}) => ({
  client_id: id,
  client_secret: `${id.replace(/-app$/, '')}-secret`,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
  roles,
  upn: `${id}@example.org`,
  oid: `oid-${id}`,
  tid,
  ...extra,
});

const clients = [
  client('admin-app', ['Administrator'], TENANT_A),
  client('reader-app', ['Reader'], TENANT_A),
  client('writer-app', ['Writer'], TENANT_A),
  client('readwrite-app', ['Reader', 'Writer'], TENANT_A),
  client('norole-app', [], TENANT_A),
  client('tenantb-reader-app', ['Reader'], TENANT_B),
  client('other-tenant-app', ['Administrator'], TENANT_X),
  // The demo's participants (scripts/demo.sh links them to FHIR resources with /manage/link).
  client('practitioner-app', ['Practitioner'], TENANT_A),
  client('patient-app', ['Patient'], TENANT_A),
  client('optout-patient-app', ['Patient'], TENANT_A),
  // load-tests/run.sh P2: a patient identified by the fhirUser claim (no identity link needed).
  client('bench-patient-app', ['Patient'], TENANT_A, { fhirUser: 'Patient/p1' }),
  // The gateway's own service identity towards the FHIR server (upstream client credentials).
  client('gateway-service', ['FhirDataContributor'], TENANT_A),
];

const jwks = await loadKeys();
const configuration = {
  clients,
  jwks,
  extraClientMetadata: { properties: ['roles', 'upn', 'oid', 'tid', 'fhirUser'] },
  scopes: ['openid', 'system/*.read', 'system/*.write', 'system/*.*', 'user/*.read', 'user/*.write',
    'patient/*.read', 'patient/Observation.read', 'fhir.read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => AUDIENCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => ({
        audience: resource,
        accessTokenTTL: TTL,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
        scope: 'system/*.read system/*.write system/*.* user/*.read user/*.write patient/*.read patient/Observation.read fhir.read',
      }),
    },
  },
  ttl: { ClientCredentials: TTL },
  async extraTokenClaims(ctx, token) {
    const c = await ctx.oidc.provider.Client.find(token.clientId);
    if (!c) return {};
    const claims = { roles: c.roles, upn: c.upn, oid: c.oid, tid: c.tid, scp: token.scope, azp: token.clientId };
    if (c.fhirUser) claims.fhirUser = c.fhirUser; // only clients that have one (bench-patient-app)
    return claims;
  },
};

const provider = new Provider(ISSUER, configuration);
provider.listen(PORT, '127.0.0.1');
console.log(`oidc-provider listening on ${ISSUER}`);
