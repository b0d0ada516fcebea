// A real OpenID provider (the certified `oidc-provider` package) for the
// single sign-on tests. Usage: node provider.mjs <cert.pem> <key.pem> <redirect_uri>
// Serves HTTPS on localhost on a free port and prints `ready <port>` once
// listening. The account signing in is the authorization request's
// `login_hint`: `verified:<email>` or `unverified:<email>`, subject
// `sub-<hint>`. Login and consent are granted without a form.
import fs from "node:fs";
import https from "node:https";
import Provider from "oidc-provider";

const [certFile, keyFile, redirectUri] = process.argv.slice(2);
if (!certFile || !keyFile || !redirectUri) {
  console.error("usage: node provider.mjs <cert.pem> <key.pem> <redirect_uri>");
  process.exit(2);
}

function claimsFor(accountId) {
  const [kind, email] = accountId.split(/:(.*)/s);
  return {
    sub: `sub-${accountId}`,
    email,
    email_verified: kind === "verified",
    name: email,
  };
}

let provider;
const server = https.createServer(
  { cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) },
  async (req, res) => {
    try {
      if (req.url.startsWith("/interaction/")) {
        const details = await provider.interactionDetails(req, res);
        const hint = details.params.login_hint;
        if (typeof hint !== "string" || !hint.includes(":")) {
          res.writeHead(400).end("login_hint must be verified:<email> or unverified:<email>");
          return;
        }
        await provider.interactionFinished(req, res, { login: { accountId: hint } }, {
          mergeWithLastSubmission: false,
        });
        return;
      }
      provider.callback()(req, res);
    } catch (e) {
      console.error(e);
      res.writeHead(500).end(String(e));
    }
  },
);

server.listen(0, "localhost", () => {
  const { port } = server.address();
  provider = new Provider(`https://localhost:${port}`, {
    clients: [
      {
        client_id: "llmgw",
        client_secret: "llmgw-test-secret",
        redirect_uris: [redirectUri],
        grant_types: ["authorization_code"],
        response_types: ["code"],
        token_endpoint_auth_method: "client_secret_basic",
      },
    ],
    async findAccount(_ctx, id) {
      return { accountId: id, claims: async () => ({ ...claimsFor(id), sub: `sub-${id}` }) };
    },
    claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"] },
    // Put the requested claims in the ID token, which is what llmgw reads.
    conformIdTokenClaims: false,
    features: { devInteractions: { enabled: false } },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    // A first-party client: consent is implied.
    async loadExistingGrant(ctx) {
      const grantId =
        ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) {
        const existing = await ctx.oidc.provider.Grant.find(grantId);
        if (existing) return existing;
      }
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope("openid email profile");
      await grant.save();
      return grant;
    },
    cookies: { keys: ["llmgw-test-cookie-key"] },
  });
  console.log(`ready ${port}`);
});
