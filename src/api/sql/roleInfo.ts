/**
 * What the sidecar's database role is: a superuser or BYPASSRLS role skips row-level security, and only
 * a role registered in public.outbox_api_roles is confined by the policies of sql/007.
 */
export const ROLE_INFO_SQL = `
SELECT current_user::text AS role, r.rolsuper AS superuser, r.rolbypassrls AS bypass_rls,
       EXISTS (SELECT 1 FROM public.outbox_api_roles AS a WHERE a.role_name = current_user) AS registered
FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user`;

export interface RoleInfo {
  role: string;
  superuser: boolean;
  bypass_rls: boolean;
  registered: boolean;
}
